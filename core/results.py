"""What every stage runner returns: a frozen dataclass per stage, one shape for all of them.

``run_<stage>(storage, as_of, conf, ...) -> <Stage>Result``. A result answers two readers:

* a person: :meth:`StageResult.summary_line` is the one line the nightly run records in
  ``pipeline_runs`` and the verbs print;
* a machine: :meth:`StageResult.asdict` is the JSON-ready dict (``--json``, the nightly step's
  details), dates as ``YYYY-MM-DD``, with the keys the runners' dicts always had.

A field declared with :func:`omitted_when_none` is left out of :meth:`asdict` while it is None (a
key that only some runs have, e.g. ``updated_from`` for an incremental features run).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

_OMIT = "omit_when_none"


def omitted_when_none(default: Any = None) -> Any:
    """A result field whose key :meth:`StageResult.asdict` leaves out while it is None."""
    return dataclasses.field(default=default, metadata={_OMIT: True})


def jsonable(value: Any) -> Any:
    """Dates to ISO strings, nested results to dicts, tuples to lists (recursively)."""
    if isinstance(value, StageResult):
        return value.asdict()
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


@dataclasses.dataclass(frozen=True)
class StageResult:
    """Base of the stage results (see the module docstring)."""

    def asdict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is None and spec.metadata.get(_OMIT):
                continue
            out[spec.name] = jsonable(value)
        return out

    def summary_line(self) -> str:
        """One line for a person: each stage's result says what matters."""
        raise NotImplementedError(type(self).__name__)
