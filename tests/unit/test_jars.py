"""core.jars: pinned jars fetched into the cache only whole and with the pinned SHA-256."""
from __future__ import annotations

import hashlib

import pytest

from core import jars


def _repository(tmp_path, content: bytes, pinned_sha: str):
    repo = tmp_path / "repo"
    folder = repo / "io" / "example" / "thing" / "1.0"
    folder.mkdir(parents=True)
    (folder / "thing-1.0.jar").write_bytes(content)
    lock = tmp_path / "jars.lock"
    lock.write_text(f"# test\ndelta  io.example:thing:1.0  {pinned_sha}\n")
    return repo.as_uri(), lock


def test_fetch_puts_a_checked_jar_in_place_once(tmp_path, monkeypatch):
    content = b"jar bytes"
    url, lock = _repository(tmp_path, content, hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(jars, "MAVEN_CENTRAL", url)
    monkeypatch.setattr(jars, "LOCK", lock)
    cache = tmp_path / "cache"
    assert jars.present("delta", cache) is None
    (path,) = jars.fetch(("delta",), cache, quiet=True)
    assert path.read_bytes() == content and jars.present("delta", cache) == [path]
    (tmp_path / "repo" / "io" / "example" / "thing" / "1.0" / "thing-1.0.jar").unlink()
    assert jars.fetch(("delta",), cache, quiet=True) == [path]      # present: not fetched again


def test_a_jar_with_another_hash_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    url, lock = _repository(tmp_path, b"tampered", "0" * 64)
    monkeypatch.setattr(jars, "MAVEN_CENTRAL", url)
    monkeypatch.setattr(jars, "LOCK", lock)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="io.example:thing:1.0: SHA-256 .* does not match"):
        jars.fetch(("delta",), cache, quiet=True)
    assert list(cache.iterdir()) == []


def test_s3_jars_join_a_local_session_only_when_asked(monkeypatch, tmp_path):
    from core.spark import local_jar_settings

    monkeypatch.setenv("CVSEG_JARS_DIR", str(tmp_path))
    for jar in jars.pinned():
        (tmp_path / jar.file_name).write_bytes(b"")
    without, with_s3 = local_jar_settings({}), local_jar_settings({}, s3=True)
    assert "hadoop-aws" not in without["spark.jars"] and "hadoop-aws" in with_s3["spark.jars"]
    assert without["spark.sql.catalog.spark_catalog"].endswith("DeltaCatalog")
    assert local_jar_settings({"spark.jars.packages": "x:y:1"}) == {}     # the caller's own jars
