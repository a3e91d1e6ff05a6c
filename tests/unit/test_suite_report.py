"""The suite's own report: `./dev test` (``--durations``) ends with the seconds per test module."""
from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def test_seconds_per_module_are_summed_with_their_fixtures_and_only_with_durations(pytester):
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makepyfile(
        test_slow="""
            import time, pytest

            @pytest.fixture(scope="module")
            def shared():
                time.sleep(0.6)

            def test_one(shared):
                time.sleep(0.2)

            def test_two(shared):
                pass
        """,
        test_fast="def test_quick():\n    pass\n")
    with_durations = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--durations=1")
    with_durations.assert_outcomes(passed=3)
    lines = with_durations.stdout.lines
    table = lines[next(i for i, line in enumerate(lines) if "seconds per test module" in line) + 1:][:2]
    slow, fast = (line.split() for line in table)
    assert (slow[2], slow[4], fast[2], fast[4]) == ("2", "test_slow.py", "1", "test_fast.py")
    assert float(slow[0].rstrip("s")) >= 0.8 > float(fast[0].rstrip("s"))   # the module fixture counts

    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    plain.assert_outcomes(passed=3)
    assert "seconds per test module" not in plain.stdout.str()
