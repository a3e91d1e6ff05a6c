"""The fits' decisions do not depend on the BLAS kernel or its thread count.

OpenBLAS picks a kernel per CPU (and sums in a different order per kernel and thread count), so
the last bits of every likelihood differ between machines. Which rung of the fallback ladder a
fit takes, whether it converged and which cause a failure names must not; the parameters may
differ only in those last bits. Each combination runs in its own interpreter, because OpenBLAS
reads ``OPENBLAS_CORETYPE`` once, when it is loaded. ``./dev kernels`` runs the whole model
suite the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

FITS = r'''
import json, warnings
import numpy as np
from threadpoolctl import threadpool_info
from models import BGNBDModel, MBGNBDModel, ParetoNBDModel, GammaGammaModel
from tests.unit.models.helpers import simulate_bgnbd, unique_rows

def ladder(model):
    info = model.fit_info_
    return {"penalizer": info["penalizer"], "start": info["start"],
            "failed": [(f["penalizer"], f["start"], f["error"].split(":")[0] + ":" + f["error"].split(":")[1][:40])
                       for f in info["failed_attempts"]],
            "params": model.params_}

out = {"blas": sorted({(i.get("internal_api"), i.get("architecture"), i.get("num_threads"))
                       for i in threadpool_info() if i.get("internal_api") == "openblas"})}
# no dropout ever observed: the unpenalised likelihood has no maximum, a penalised rung is needed
T = np.linspace(10, 300, 200)
frequency, recency = np.full(200, 5.0), 0.99 * T
out["bgnbd_flat"] = ladder(BGNBDModel().fit(frequency, recency, T))
out["mbgnbd_flat"] = ladder(MBGNBDModel().fit(frequency, recency, T))
# a well-posed data set, fitted by every purchase model and Gamma-Gamma
rng = np.random.default_rng(11)
rows = simulate_bgnbd(4000, r=0.7, alpha=30.0, a=0.8, b=2.5, T=np.floor(rng.uniform(30, 500, 4000)), seed=11)
rows["recency"] = np.floor(rows["recency"])
u = unique_rows(rows, ["frequency", "recency", "T"])
for name, cls in (("bgnbd", BGNBDModel), ("mbgnbd", MBGNBDModel), ("pareto", ParetoNBDModel)):
    out[name] = ladder(cls().fit(u.frequency, u.recency, u["T"], u.n))
repeat = rows[rows.frequency > 0]
spend = GammaGammaModel().fit(repeat.frequency, rng.gamma(5.0, 900.0, len(repeat)))
out["gamma_gamma"] = {"params": spend.params_, "penalizer": spend.fit_info_.get("penalizer")}
print(json.dumps(out))
'''


def _combinations() -> list[tuple[str, int]]:
    kernels = ["Haswell", "Prescott"]
    try:
        if "avx512f" in Path("/proc/cpuinfo").read_text():
            kernels.insert(1, "SkylakeX")      # needs AVX-512: forcing it elsewhere stops the process
    except OSError:
        pass
    return [(kernel, threads) for kernel in kernels for threads in (1, 2)]


def _run(kernel: str, threads: int) -> dict:
    env = dict(os.environ, OPENBLAS_CORETYPE=kernel, OPENBLAS_NUM_THREADS=str(threads), PYTHONHASHSEED="0")
    done = subprocess.run([sys.executable, "-c", FITS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, int], dict]:
    if sys.platform != "linux":
        pytest.skip("OPENBLAS_CORETYPE is read by the OpenBLAS that numpy/scipy wheels ship on Linux x86-64")
    return {combo: _run(*combo) for combo in _combinations()}


def test_each_combination_ran_the_kernel_it_asked_for(results):
    for (kernel, threads), out in results.items():
        architectures = {arch for _, arch, _ in out["blas"]}
        # OpenBLAS names the Prescott kernel's core "Katmai" in its configuration string
        assert architectures <= {kernel, "Katmai" if kernel == "Prescott" else kernel}, (kernel, out["blas"])
        assert {n for _, _, n in out["blas"]} == {threads}


def test_the_ladder_decisions_are_the_same_on_every_kernel(results):
    decisions = {combo: {name: (fit["penalizer"], fit.get("start"), fit.get("failed"))
                         for name, fit in out.items() if name != "blas"}
                 for combo, out in results.items()}
    reference_combo, reference = next(iter(decisions.items()))
    for combo, decided in decisions.items():
        assert decided == reference, f"{combo} decided differently from {reference_combo}"
    # what matters in the flat case: a penalised rung was needed, and the cause was named
    flat = reference["bgnbd_flat"]
    assert flat[0] > 0 and any("likelihood has no unique maximum" in f[2] or "ConvergenceFailure" in f[2]
                               for f in flat[2])


#: How closely each fit's parameters agree across kernels: the BG/NBD family ends with Newton steps
#: on an analytic gradient (~1e-10), Gamma-Gamma likewise; Pareto/NBD's BFGS runs on a
#: finite-difference gradient with gtol 1e-6, so it stops ~2e-5 (relative) apart in the correlated
#: (s, beta) direction, which moves expected purchases by less than that.
AGREEMENT = {"bgnbd": 1e-7, "mbgnbd": 1e-7, "gamma_gamma": 1e-7, "pareto": 1e-4}


def test_the_parameters_differ_only_as_far_as_the_optimiser_resolves_them(results):
    reference = next(iter(results.values()))
    for combo, out in results.items():
        for name, tolerance in AGREEMENT.items():
            for key, value in reference[name]["params"].items():
                assert out[name]["params"][key] == pytest.approx(value, rel=tolerance), (combo, name, key)
