"""Ingest: a client's order export -> the canonical ``orders`` table, bad rows -> ``orders_quarantine``.

Layout (STYLE.md): column functions and DataFrame transforms first (no I/O, no config reads: every
value comes in as an argument), then the source readers, then ONE stage runner, :func:`run_ingest`,
which reads the source, composes the transforms and writes through :class:`core.storage.Storage`.

How a run goes
1. Read the export with every column as text (CSV) or as stored (parquet/Delta); each row keeps its
   file and position, so ``source_row`` (1 = first data row after the header) is exact without
   collecting rows: ``_metadata.row_index`` for parquet, and for CSV ``monotonically_increasing_id``
   turned into per-file ordinals with one small count per file split. A CSV row with more or fewer
   fields than the header is flagged ``_is_malformed`` as it is read (Spark's corrupt-record column,
   which also gives its line; for whitespace exports, the word count): its values may sit in the
   wrong columns, so it is quarantined as ``malformed_row`` and takes no part in duplicate checks.
2. Map client columns onto canonical names (``source.columns``), parse amounts, timestamps (local
   text in ``source_timezone`` -> UTC instant; ``order_date`` is the day in the business zone) and
   the cancellation style.
3. Duplicates: one aggregation (pass 1) finds the order ids seen more than once. Exact duplicates
   (every mapped field equal) are counted and dropped, the first in read order kept; when the rows
   of an order id differ, all of them (copies included) are quarantined as
   ``duplicate_order_conflict``. At grain line, lines of one order must agree on customer and time.
4. Negative "cancellation lines" (UCI Online Retail style) are folded into an order: the one whose id
   is the line's id without the prefix (same customer) or, failing that, the customer's most recent
   order at or before the cancellation (UCI credit notes do not reference their invoice, so this is
   a documented heuristic). A line with no such order is quarantined. Lines are matched within one
   ingest only.
5. Rules from :mod:`pipelines.validation` give every row a kind (order, cancellation line applied,
   quarantined, exact duplicate). Pass 2 keeps only the rows that are not plain orders (few) and
   counts them in ONE aggregation (their messages are made from the kept rows, not in the scan);
   accepted = input - the rest, so
   ``input rows = accepted + cancellation lines applied + quarantined + exact duplicates`` holds by
   construction and is printed.
6. Above ``validation.max_rejected_share`` the quarantine and the ``ingest_runs`` row are written but
   not the orders (no half-written orders) and :class:`IngestRejectedError` says what to inspect.
   Otherwise (pass 3) orders are merged by ``order_id``: orders whose content is unchanged are not
   rewritten, so re-ingesting a file adds nothing; a changed order from a later export replaces the
   earlier one (corrections arrive as re-exports). Quarantine rows merge by (source_file, source_row).

New files only (``source.new_files_only``, the default): the files Spark lists for the source are
described by the file system (path, size, modification time; no data read) and those already in
``ingested_files`` unchanged are skipped, so a nightly run over a folder that gains one file a day
reads that file, not the whole history. A run with nothing new records an ``unchanged`` run and
writes nothing else. A Delta source is read whole when any of its files is new. Files are recorded
after the orders are committed (a crash in between only means they are read again: the merge
makes that harmless), and never for a rejected run, so they are retried once the cause is fixed.

Why three passes over the export and no cache of every row: on this engine's target machines
(2 cores) building an in-memory cache of all parsed rows cost more than parsing the export again,
and a window over all rows (a full sort) cost more than an aggregation of keys.

Package layout: :mod:`.summary` (errors, the run summary), :mod:`.transforms` (pure column
functions and DataFrame transforms), :mod:`.reading` (the source edge), :mod:`.runner` (the stage runner).
"""
from pipelines.ingest.runner import KeyReading, PendingIngest, add_keys, read_day, read_source_orders, run_ingest
from pipelines.ingest.summary import DEFAULT_SOURCE, IngestError, IngestRejectedError, IngestSummary
from pipelines.ingest.transforms import is_non_numeric_amount, local_date, parse_amount, parse_timestamp

__all__ = ["run_ingest", "read_source_orders", "add_keys", "PendingIngest", "read_day", "KeyReading", "IngestError",
           "IngestRejectedError", "IngestSummary", "DEFAULT_SOURCE", "is_non_numeric_amount", "local_date",
           "parse_amount", "parse_timestamp"]
