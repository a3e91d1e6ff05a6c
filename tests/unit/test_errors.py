"""One error hierarchy (core/errors.py): every error the engine defines derives from CvsegError, and
the command line's exit code follows from the class, not from a list of names."""
from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil

import pytest

import core
import cvseg
import datagen
import jobs
import models
import pipelines
import report
from core.errors import CvsegError, InternalError, UserError
from jobs.common import run_main

# control flow, not errors: caught where they are raised
NOT_ERRORS = {"pipelines.hybrid.HybridSkipped"}


def _engine_exception_classes() -> list[type[BaseException]]:
    found = []
    for package in (core, models, pipelines, report, datagen, jobs, cvseg):
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if (issubclass(cls, BaseException) and cls.__module__ == info.name
                        and f"{cls.__module__}.{cls.__name__}" not in NOT_ERRORS):
                    found.append(cls)
    return found


def test_every_engine_error_derives_from_the_one_base():
    classes = _engine_exception_classes()
    assert len(classes) >= 20          # the walk found the stages' errors
    outside = sorted(f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, CvsegError))
    assert outside == []
    # a stage error keeps its builtin base, so `except ValueError` callers keep working
    from pipelines.ingest import IngestRejectedError

    assert issubclass(IngestRejectedError, UserError) and issubclass(IngestRejectedError, ValueError)
    assert not issubclass(UserError, InternalError)


@pytest.mark.parametrize("raised, code", [
    (UserError("map the column order_date"), 2),
    (FileNotFoundError("no such export"), 2),
    (InternalError("schema contract broken"), 1),
    (KeyError("a bug"), 1),
])
def test_exit_code_follows_the_class(raised, code, capsys):
    def verb(args):
        raise raised

    assert run_main(verb, argparse.Namespace(debug=False)) == code
    err = capsys.readouterr().err
    assert (err.startswith("error: ") and "unexpected" not in err) if code == 2 else "unexpected" in err


def test_a_stage_error_is_a_user_error_at_the_command_line(capsys):
    from pipelines.features import FeaturesError

    def verb(args):
        raise FeaturesError("orders end before 2026-09-30: ingest the missing days first")

    assert run_main(verb, argparse.Namespace(debug=False)) == 2
    assert capsys.readouterr().err == "error: orders end before 2026-09-30: ingest the missing days first\n"
