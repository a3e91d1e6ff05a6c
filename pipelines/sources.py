"""Every configured order source, then the identity step: what `cvseg ingest` and the nightly
``ingest`` step run.

Each source (``sources``, or the lone ``source``) is ingested on its own (:func:`pipelines.ingest.run_ingest`:
its files, its quarantine rows, its ``ingest_runs`` row, all carrying its name); with several
sources their order ids are kept apart as ``<source>:<order id>``. Their matching keys are
compared with ``identity_keys`` together once every source is read (one scan on a regular night,
whose holders the identity step reuses), and only then is each source's run recorded (a crash
before that reads its files again). Then, when there are several sources or an ``identity``
config, :func:`pipelines.identity.run_identity` gives every source customer id its unified id. A
source whose rejected share is above the threshold stops the run after the sources before it are
committed (they are complete on their own); the identity step does not run, so no stage reads a
half-resolved customer base.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from pyspark.sql import SparkSession

from core.config import Config
from core.results import StageResult
from core.storage import Storage
from pipelines.identity import IdentitySummary, NightKeys, identity_hmac_key, run_identity
from pipelines.ingest import IngestError, IngestSummary, KeyReading, PendingIngest, add_keys, read_source_orders

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourcesResult(StageResult):
    """Each source's ingest summary and, when identities are resolved, the identity step's."""
    summaries: tuple[IngestSummary, ...]
    identity: IdentitySummary | None

    def total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.summaries)

    def to_lines(self) -> list[str]:
        lines = [line for s in self.summaries for line in s.to_lines()]
        if len(self.summaries) > 1:
            n = "{:,}".format
            lines.append(f"all {len(self.summaries)} sources: input rows {n(self.total('input_rows'))}, accepted "
                         f"{n(self.total('accepted_rows'))}, quarantined {n(self.total('quarantined_rows'))}, "
                         f"exact duplicates {n(self.total('exact_duplicate_rows'))}, orders new or changed "
                         f"{n(self.total('orders_written'))}")
        if self.identity is not None:
            lines += self.identity.to_lines()
        return lines

    def __str__(self) -> str:
        return "\n".join(self.to_lines())

    def asdict(self) -> dict[str, Any]:
        return {"input_rows": self.total("input_rows"), "orders_written": self.total("orders_written"),
                "quarantined_rows": self.total("quarantined_rows"),
                **({"identity": self.identity.asdict()} if self.identity else {})}

    def summary_line(self) -> str:
        unknown = sorted({v for s in self.summaries for v in s.unknown_statuses})
        unknown_text = f"; status value(s) never seen before counted as live: {', '.join(unknown)}" if unknown else ""
        identity = (f"; {self.identity.source_ids:,} source ids -> {self.identity.customers:,} customers, "
                    f"{self.identity.conflicts:,} identity conflicts" if self.identity else "")
        return (f"{self.total('input_rows'):,} rows read, {self.total('orders_written'):,} orders new or changed, "
                f"{self.total('quarantined_rows'):,} quarantined{unknown_text}{identity}")


def run_sources(spark: SparkSession, storage: Storage, config: Config, run_date: dt.date, *,
                path: str | None = None, only: str | None = None, all_files: bool = False) -> SourcesResult:
    """Ingest every source (or the one named ``only``; ``path`` replaces its path), then resolve
    identities when configured."""
    sources = config.order_sources
    names = [s.name for s in sources]
    if only is not None and only not in names:
        raise IngestError(f"--source {only!r} is not a configured source; the sources are {names}")
    if path is not None and only is None and len(sources) > 1:
        raise IngestError(f"one path given for several sources ({names}): set each source's path "
                          "(sources[].path), or run `cvseg ingest --source NAME --path P` for one of them")
    hmac_key = identity_hmac_key(config)
    keys = (KeyReading(config.identity.match_on, hmac_key, config.identity.phone_country_code)
            if hmac_key is not None else None)
    reads: list[PendingIngest] = []
    try:
        for source in sources:
            if only is not None and source.name != only:
                continue
            if all_files:
                source = source.model_copy(update={"new_files_only": False})
            source_path = path if (path is not None and (only == source.name or len(sources) == 1)) else source.path
            if not source_path:
                where = "source.path" if len(sources) == 1 else f"the path of source {source.name!r} (sources[].path)"
                raise IngestError(f"no path to ingest: set {where} in the conf or pass --path")
            reads.append(read_source_orders(
                spark, storage, source, config.validation, config.business.timezone, run_date, path=source_path,
                order_id_prefix=f"{source.name}:" if len(sources) > 1 else "", keys=keys))
    except Exception:
        try:
            _finish(storage, reads)     # the sources read before are complete on their own
        except Exception:               # the first error is the one to report
            log.exception("the sources read before the error could not be recorded: their files are read again")
        raise
    summaries, night_keys = _finish(storage, reads)
    identity = None
    if config.has_identity_step:
        identity = run_identity(storage, config.identity, names, run_date, night_keys=night_keys)
    return SourcesResult(summaries, identity)


def _finish(storage: Storage, reads: list[PendingIngest]) -> tuple[tuple[IngestSummary, ...], NightKeys | None]:
    """Every source's new matching keys appended in one comparison with ``identity_keys`` (one scan
    on a night, whose holders the identity step reuses), then each source's files and run recorded."""
    added, night_keys = add_keys(storage, reads)
    return tuple(r.finish(added.get(r.summary.source_name, 0)) for r in reads), night_keys
