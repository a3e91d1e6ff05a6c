"""requirements.lock is what ./dev installs: it must satisfy setup.py and be what is installed.

When a test here fails, setup.py (or requirements-tools.in) and the lock have drifted apart:
run ``./dev lock`` to re-resolve, then ``./dev test``.
"""
from __future__ import annotations

import re
import runpy
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import setuptools
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]+?))?\s*\\?$")


def locked_pins(text: str) -> dict[str, list[tuple[Version, Marker | None]]]:
    """name -> [(version, marker)] of every ``name==version [; marker]`` line of a uv/pip-tools lock."""
    pins: dict[str, list[tuple[Version, Marker | None]]] = {}
    for line in text.splitlines():
        match = PIN.match(line.strip())
        if match:
            marker = Marker(match["marker"]) if match["marker"] else None
            pins.setdefault(canonicalize_name(match["name"]), []).append((Version(match["version"]), marker))
    return pins


def pin_for_this_interpreter(pins, name: str) -> Version | None:
    applicable = [v for v, marker in pins.get(canonicalize_name(name), []) if marker is None or marker.evaluate()]
    assert len(applicable) <= 1, f"{name}: several pins apply here: {applicable}"
    return applicable[0] if applicable else None


def declared_requirements(monkeypatch) -> list[Requirement]:
    """setup.py's install_requires + the dev extra, read by running setup.py with setup() captured."""
    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    tools = [line.split("#")[0].strip() for line in (ROOT / "requirements-tools.in").read_text().splitlines()]
    names = captured["install_requires"] + captured["extras_require"]["dev"] + [t for t in tools if t]
    return [Requirement(r) for r in names]


@pytest.fixture(scope="module")
def pins():
    return locked_pins((ROOT / "requirements.lock").read_text())


def test_the_parser_reads_plain_and_marked_pins():
    text = ("numpy==2.4.6 ; python_full_version < '3.12' \\\n    --hash=sha256:ab\n"
            "numpy==2.5.5 ; python_full_version >= '3.12' \\\nuv==0.13.9 \\\n    # via -r tools.in\n")
    pins = locked_pins(text)
    assert [str(v) for v, _ in pins["numpy"]] == ["2.4.6", "2.5.5"] and pins["uv"][0] == (Version("0.13.9"), None)
    assert pin_for_this_interpreter(pins, "uv") == Version("0.13.9")


def test_the_lock_satisfies_setup_py(monkeypatch, pins):
    problems = []
    for requirement in declared_requirements(monkeypatch):
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "dev"}):
            continue
        locked = pin_for_this_interpreter(pins, requirement.name)
        if locked is None:
            problems.append(f"{requirement.name} is not in the lock")
        elif not requirement.specifier.contains(locked, prereleases=True):
            problems.append(f"{requirement.name}: locked {locked} is outside setup.py's {requirement.specifier}")
    assert not problems, "requirements.lock no longer satisfies setup.py (run ./dev lock): " + "; ".join(problems)


def test_every_pin_carries_hashes():
    text = (ROOT / "requirements.lock").read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    unhashed = [b.split()[0] for b in blocks if PIN.match(b.splitlines()[0].strip()) and "--hash=sha256:" not in b]
    assert not unhashed


def test_the_environment_is_the_lock(pins):
    """What ./dev installed is exactly the lock (a stale .venv is reinstalled by ./dev)."""
    drift = []
    for name in pins:
        locked = pin_for_this_interpreter(pins, name)
        if locked is None:
            continue
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            drift.append(f"{name} {locked} is not installed")
            continue
        if installed != locked:
            drift.append(f"{name}: installed {installed}, locked {locked}")
    assert not drift, "the environment differs from requirements.lock (run ./dev test to reinstall): " + "; ".join(drift)
