"""The JVM jars a local Spark session gets: Delta Lake and s3a, pinned in ``core/jars.lock``.

On Databricks and EMR the platform provides them. On a laptop or CI machine ``./dev`` fetches
them once from Maven Central (``python -m core.jars fetch``) into a cache folder
(``$CVSEG_JARS_DIR``, default ``~/.cache/cvseg/jars``), checking each file's SHA-256 against the
lock, and :func:`core.spark.build_spark` hands the files present to ``spark.jars``: no network
when a session starts, so an offline laptop with a filled cache runs delta-spark, and one
without jars runs the deltalake (delta-rs) backend.

The other way Spark can get them, resolution at session start through ``spark.jars.packages``
(what ``delta.configure_spark_with_delta_pip`` does; cached by Ivy in ``~/.ivy2``), works too:
``--set 'spark.extra={"spark.jars.packages": "<coordinates>"}'`` with the coordinates from
:func:`coordinates`; the engine then adds no jars of its own.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

LOCK = Path(__file__).with_name("jars.lock")
MAVEN_CENTRAL = os.environ.get("CVSEG_MAVEN_REPOSITORY", "https://repo1.maven.org/maven2")


@dataclass(frozen=True)
class Jar:
    group: str          # "delta" or "s3": what the jar is for
    group_id: str
    artifact_id: str
    version: str
    sha256: str

    @property
    def coordinates(self) -> str:
        return f"{self.group_id}:{self.artifact_id}:{self.version}"

    @property
    def file_name(self) -> str:
        return f"{self.artifact_id}-{self.version}.jar"

    @property
    def url(self) -> str:
        return (f"{MAVEN_CENTRAL}/{self.group_id.replace('.', '/')}/{self.artifact_id}/{self.version}/"
                f"{self.file_name}")


def pinned(lock: Path | None = None) -> list[Jar]:
    """The jars of ``core/jars.lock`` (or ``lock``), in order."""
    jars = []
    for line in (lock or LOCK).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        group, coordinates, sha256 = line.split()
        group_id, artifact_id, version = coordinates.split(":")
        jars.append(Jar(group, group_id, artifact_id, version, sha256.lower()))
    return jars


def coordinates(group: str) -> list[str]:
    """Maven coordinates of one group ("delta" or "s3"), e.g. for ``spark.jars.packages``."""
    return [jar.coordinates for jar in pinned() if jar.group == group]


def version_of(artifact_id: str) -> str:
    """The pinned version of an artifact (e.g. ``delta-spark_2.13``)."""
    for jar in pinned():
        if jar.artifact_id == artifact_id:
            return jar.version
    raise KeyError(f"{artifact_id} is not in {LOCK}")


def jar_dir() -> Path:
    return Path(os.environ.get("CVSEG_JARS_DIR") or Path.home() / ".cache" / "cvseg" / "jars")


def present(group: str | None = None, folder: Path | None = None) -> list[Path] | None:
    """Paths of the pinned jars (of ``group``) in the cache folder; None unless all are there.

    Files are only ever put there whole and checked (see :func:`fetch`), so presence is enough.
    """
    folder = folder or jar_dir()
    paths = [folder / jar.file_name for jar in pinned() if group is None or jar.group == group]
    return paths if all(p.is_file() for p in paths) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(groups: tuple[str, ...] = ("delta", "s3"), folder: Path | None = None, quiet: bool = False) -> list[Path]:
    """Download the missing pinned jars of ``groups`` into the cache folder; SHA-256 checked,
    moved into place only when whole. Raises ``RuntimeError`` naming the jar and URL on failure."""
    folder = folder or jar_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for jar in pinned():
        if jar.group not in groups:
            continue
        target = folder / jar.file_name
        paths.append(target)
        if target.is_file():
            continue
        if not quiet:
            print(f"fetching {jar.coordinates} from {MAVEN_CENTRAL}", file=sys.stderr)
        handle, partial = tempfile.mkstemp(dir=folder, prefix=f".{jar.file_name}.", suffix=".part")
        os.close(handle)
        try:
            with urllib.request.urlopen(jar.url, timeout=60) as response, open(partial, "wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
            actual = _sha256(Path(partial))
            if actual != jar.sha256:
                raise RuntimeError(f"{jar.coordinates}: SHA-256 {actual} does not match {jar.sha256} in {LOCK}")
            os.chmod(partial, 0o644)              # mkstemp makes it private; the cache is shared
            os.replace(partial, target)
        except OSError as exc:
            raise RuntimeError(f"cannot fetch {jar.coordinates} from {jar.url}: {exc}; without the jars the "
                               "engine runs on the deltalake backend (set CVSEG_MAVEN_REPOSITORY for a "
                               "mirror)") from exc
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.jars", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("fetch", help="download the missing pinned jars into the cache folder")
    get.add_argument("--group", action="append", choices=["delta", "s3"],
                     help="only this group (repeatable; default: all)")
    sub.add_parser("path", help="print the cache folder")
    sub.add_parser("coordinates", help="print the pinned Maven coordinates (for spark.jars.packages)")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            fetch(tuple(args.group or ("delta", "s3")))
        except RuntimeError as exc:
            print(f"warning: {exc}", file=sys.stderr)
            return 1
    elif args.command == "path":
        print(jar_dir())
    else:
        print(",".join(jar.coordinates for jar in pinned()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
