"""Ingest's errors and its run summary (what `cvseg ingest` prints and `ingest_runs` records)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime


from core.errors import UserError




# --------------------------------------------------------------------------------------------
# Errors and the run summary
# --------------------------------------------------------------------------------------------
class IngestError(UserError, ValueError):
    """The source cannot be ingested as configured; the message says what to fix."""


class IngestRejectedError(IngestError):
    """Too many rows were quarantined; the quarantine and the run record were written, orders not."""

    def __init__(self, message: str, summary: "IngestSummary"):
        super().__init__(message)
        self.summary = summary


DEFAULT_SOURCE = "default"   # the name of a lone `source` (core.config.SourceConf.name)

# Row kinds: every input row is exactly one of these.
KIND_ORDER, KIND_CANCELLATION, KIND_QUARANTINED, KIND_DUPLICATE = (
    "order", "cancellation", "quarantined", "exact_duplicate")


@dataclass(frozen=True)
class IngestSummary:
    ingest_run_id: str
    source_name: str
    run_date: date
    source_path: str
    status: str                      # ok | rejected | unchanged (every file already ingested)
    input_rows: int
    accepted_rows: int               # accepted order rows (order lines when grain is line)
    cancellation_lines_applied: int
    quarantined_rows: int
    exact_duplicate_rows: int
    orders_accepted: int             # orders built from the accepted rows
    orders_written: int              # orders new or changed in `orders` (0 when rejected)
    reason_counts: dict[str, int] = field(default_factory=dict)
    max_rejected_share: float = 0.05
    source_files: int = 0
    cancellation_lines_by_heuristic: int = 0
    encoding_suspect_rows: int = 0
    skipped_files: int = 0           # already ingested with the same size and modification time
    future_rows_retried: int = 0     # rows quarantined as future by an earlier read, read again now that their day came
    retried_file_rows: int = 0       # rows read of files read narrowed for those rows (their customers and orders)
    narrowed_files: int = 0          # those files
    value_counts: dict[str, dict[str, int]] = field(default_factory=dict)   # status/channel/category -> value -> rows
    unknown_statuses: tuple[str, ...] = ()   # never seen before, in neither cancelled_values nor live_values
    key_rows: int = 0                # matching keys (identity.match_on) hashed and new in identity_keys
    first_order_date: date | None = None   # earliest order_date among the orders written (None: none written)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def rejected_share(self) -> float:
        return self.quarantined_rows / self.input_rows if self.input_rows else 0.0

    @property
    def is_reconciled(self) -> bool:
        return self.input_rows == (self.accepted_rows + self.cancellation_lines_applied
                                   + self.quarantined_rows + self.exact_duplicate_rows)

    def to_lines(self) -> list[str]:
        n = "{:,}".format
        if self.status == "unchanged":
            return [f"ingest {self.ingest_run_id} (unchanged) of {self._what}, run date {self.run_date}",
                    f"  no new files: all {self.skipped_files} file(s) were ingested before with the same size and "
                    "modification time (source.new_files_only; `cvseg ingest --all-files` reads them again)"]
        lines = [
            f"ingest {self.ingest_run_id} ({self.status}) of {self._what}, run date {self.run_date}",
            f"  input rows {n(self.input_rows)} from {self.source_files} file(s)"
            f" = accepted order rows {n(self.accepted_rows)}"
            f" + cancellation lines applied {n(self.cancellation_lines_applied)}"
            f" + quarantined {n(self.quarantined_rows)}"
            f" + exact duplicates dropped {n(self.exact_duplicate_rows)}"
            + ("" if self.is_reconciled else "  (DOES NOT RECONCILE: please report this)"),
            f"  orders: {n(self.orders_accepted)} accepted, {n(self.orders_written)} new or changed in `orders`",
            f"  rejected share {self.rejected_share:.1%} (limit validation.max_rejected_share="
            f"{self.max_rejected_share:.0%})",
        ]
        if self.skipped_files:
            lines.append(f"  {self.skipped_files} file(s) ingested before unchanged were skipped (source.new_files_only)")
        for column, counts in self.value_counts.items():
            shown = ", ".join(f"{value} {n(count)}" for value, count in list(counts.items())[:8])
            more = f" (+{len(counts) - 8} more)" if len(counts) > 8 else ""
            lines.append(f"  {column} values: {shown}{more}")
        if self.unknown_statuses:
            lines.append(f"  warning: status value(s) {', '.join(repr(v) for v in self.unknown_statuses)} never seen "
                         "before are counted as live orders (not in source.cancellation.cancelled_values); list "
                         "them in cancelled_values or live_values")
        if self.future_rows_retried and self.narrowed_files:
            lines.append(f"  {n(self.future_rows_retried)} row(s) quarantined as future_timestamp by an earlier ingest "
                         f"were read again (their order day has come), with the rows of their customers and orders: "
                         f"{n(self.retried_file_rows)} row(s) of {self.narrowed_files} file(s) ingested before")
        elif self.future_rows_retried:
            lines.append(f"  {n(self.future_rows_retried)} row(s) quarantined as future_timestamp by an earlier ingest "
                         f"were read again (their order day has come): their file(s) are among those read")
        if self.cancellation_lines_by_heuristic:
            lines.append(f"  {n(self.cancellation_lines_by_heuristic)} cancellation line(s) matched no order id and "
                         "were applied to the customer's latest earlier order")
        if self.reason_counts:
            lines.append("  quarantined by reason:")
            for code, count in sorted(self.reason_counts.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"    {code:<28} {n(count)}")
        if self.encoding_suspect_rows:
            lines.append(f"  warning: {n(self.encoding_suspect_rows)} row(s) hold undecodable characters (\ufffd); "
                         "check source.csv.encoding (cp932 for most Japanese back-office exports)")
        if self.key_rows:
            lines.append(f"  {n(self.key_rows)} new matching key(s) hashed into identity_keys (identity.match_on)")
        if self.quarantined_rows:
            lines.append("  inspect with `cvseg show orders_quarantine`")
        return lines

    @property
    def _what(self) -> str:
        return self.source_path if self.source_name == DEFAULT_SOURCE else f"source {self.source_name} ({self.source_path})"

    def __str__(self) -> str:
        return "\n".join(self.to_lines())


