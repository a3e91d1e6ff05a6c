"""The examples run as plain scripts: the data scientist's notebook (examples/) against the shipped
CDNOW sample, through the `cvseg` Python API, end to end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_JVM_OPTIONS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_compare_ltv_models_cdnow_runs_as_a_script(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CVSEG_EXAMPLE_DIR": str(tmp_path), "TZ": "UTC",
           "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           # the suite's JIT choice (tests/conftest.py) for the script's JVM, which its own code starts
           "JAVA_TOOL_OPTIONS": TEST_JVM_OPTIONS}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "compare_ltv_models_cdnow.py")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "2,357 customers" in out                                  # CDNOW's customers, every one featured
    assert "plain lifetimes" in out and "cohort" in out and "bgnbd" in out
    # the shipped defaults: quantile bands, so `auto` picks the champion by its ranking
    assert "champion by mean normalized_gini" in out and "registered version" in out
    assert "customers scored with model version" in out
    assert (tmp_path / "warehouse" / "customer_scores").exists()
