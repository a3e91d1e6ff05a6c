"""Calendar helpers in plain Python, one home for the engine: the stages take ``datetime.date``
(parsed at the edge, by the command line or the Python API) and compute periods with these."""
from __future__ import annotations

import calendar
import datetime as dt

from core.errors import UserError


class DateError(UserError, ValueError):
    """A value that should be a date is not; the message gives the expected form."""


def to_date(value: dt.date | dt.datetime | str) -> dt.date:
    """``date``, ``datetime`` (its date) or ``"YYYY-MM-DD"`` -> ``date``: for the edges (API, CLI)
    and the pure transforms that accept either; stage runners take a ``date``."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            raise DateError(f"date {value!r}: expected YYYY-MM-DD") from None
    raise DateError(f"date {value!r}: expected a date or a YYYY-MM-DD string")


def add_months(day: dt.date, months: int) -> dt.date:
    """Spark's ``add_months`` in Python: same day of month, clamped to the month's last day."""
    index = day.year * 12 + (day.month - 1) + months
    year, month = divmod(index, 12)
    last = calendar.monthrange(year, month + 1)[1]
    return dt.date(year, month + 1, min(day.day, last))


def monday(day: dt.date) -> dt.date:
    """The Monday of ``day``'s week (trend weeks run Monday to Sunday)."""
    return day - dt.timedelta(days=day.weekday())
