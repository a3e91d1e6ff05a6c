"""REPORT stage: the diagnostic report and the weekly report, as self-contained HTML and A4 PDF.

Layers (each usable alone):

* :mod:`.data` / :mod:`.sources` - small Spark aggregates of the engine's tables through
  :class:`core.storage.Storage` (histograms, grouped counts; never customer rows on the driver).
  A table that does not exist yet becomes a one-line note naming the command that writes it.
* :mod:`.diagnostic` / :mod:`.weekly` - data -> a :class:`.document.Document` of blocks, in one
  language (:mod:`.i18n` holds every string in Japanese and English).
* :mod:`.charts` (matplotlib), :mod:`.html` and :mod:`.pdf` (reportlab) - blocks -> files, with
  the IPAexGothic font embedded by file path (:mod:`.fonts`).

Data are gathered once and rendered in as many languages as asked.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Iterable

from core.errors import UserError
from core.storage import Storage
from report.data import DiagnosticData, WeeklyData, collect_diagnostic, collect_weekly
from report.diagnostic import build_diagnostic
from report.document import Document
from report.html import render_html
from report.pdf import render_pdf
from report.weekly import build_weekly

FORMATS = ("html", "pdf")


class ReportError(UserError, ValueError):
    """The report cannot be built; the message says what to run or change."""


def report_dir(warehouse: str, output_dir: str | None) -> Path:
    """``report.output_dir``, or ``<warehouse>/reports`` for a local warehouse."""
    if output_dir:
        target = output_dir
    elif "://" in warehouse and not warehouse.startswith("file://"):
        raise ReportError(f"the warehouse {warehouse} is not a local folder; set report.output_dir to a local "
                          "folder for the report files")
    else:
        target = os.path.join(warehouse.removeprefix("file://"), "reports")
    path = Path(target)
    path.mkdir(parents=True, exist_ok=True)
    return path


def collect(storage: Storage, as_of: dt.date, weekly: bool) -> DiagnosticData | WeeklyData:
    try:
        return collect_weekly(storage, as_of) if weekly else collect_diagnostic(storage, as_of)
    except LookupError as exc:
        raise ReportError(str(exc)) from None


def build(data: DiagnosticData | WeeklyData, language: str, currency: str, client: str,
          generated: dt.datetime | None = None) -> Document:
    generated = generated or dt.datetime.now(dt.timezone.utc)
    if isinstance(data, WeeklyData):
        return build_weekly(data, language, currency, client, generated)
    return build_diagnostic(data, language, currency, client, generated)


def _write(path: Path, payload: bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write(doc: Document, out_dir: Path, stem: str, formats: Iterable[str] = FORMATS) -> list[Path]:
    paths = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ReportError(f"report.formats: unknown format {fmt!r}; use {', '.join(FORMATS)}")
        path = out_dir / f"{stem}.{fmt}"
        _write(path, render_html(doc).encode("utf-8") if fmt == "html" else render_pdf(doc))
        paths.append(path)
    return paths


def run_report(storage: Storage, as_of: dt.date, *, weekly: bool, languages: Iterable[str], currency: str, client: str,
               out_dir: Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Gather the data once, render each language, write ``<kind>_<as-of>_<lang>.<fmt>``."""
    data = collect(storage, as_of, weekly)
    kind = "weekly" if weekly else "diagnostic"
    paths: list[Path] = []
    for language in languages:
        doc = build(data, language, currency, client)
        paths += write(doc, out_dir, f"{kind}_{as_of.isoformat()}_{language}", formats)
    return paths
