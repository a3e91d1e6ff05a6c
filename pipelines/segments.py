"""SEGMENTS stage: six-month segment generations from ``customer_scores`` (SCD type 2 history).

Segments (one per customer, precedence top to bottom; the first rule that matches wins)
-------------------------------------------------------------------------------------------
1. ``new`` - a single purchase day (``customer_features.n_purchase_days = 1``) whose date is
   within ``segments.new_customer_days`` days up to the as-of date (``D - first_order_date <
   new_customer_days``). First: a one-purchase customer has too little history to be valued, and
   the CRM action for them is the second-purchase (F2) campaign whatever the model says.
2. ``dormant`` - ``p_alive < segments.dormant_p_alive``: probably lapsed, whatever their value.
3. value bands by predicted 6-month net value (``customer_scores.predicted_net_value``), listed
   highest first in ``segments.bands``; the last band takes everyone left.

   * ``band_method: value`` - ``lower`` is an amount: a customer is in the first band with
     ``value >= lower``.
   * ``band_method: quantile`` - ``lower`` is a quantile ``p``; the cut point is the
     ``p``-quantile of the values of the customers the bands apply to (not ``new``, not
     ``dormant``), computed in Spark with ``approxQuantile`` and relative rank error
     ``segments.quantile_relative_error`` (0.001: the rank of a cut point is off by at most 0.1 %
     of the customers; exact below ~10,000 customers). A customer is in the first band with
     ``value > cut point``: ties with a cut point go to the lower band, so a band never holds
     more than its share because of ties (many customers share the same value, e.g. 0).

Generations
-----------
A generation is cut on the first run whose as-of date is ``segments.generation_months`` months or
more after the current generation's start (or the first run ever, or ``new_generation=True``).
A cut values every customer in ``customer_scores`` at ``D``, freezes the rules (bands with their
cut points, lifecycle thresholds) as JSON in ``segment_generations.definition``, closes the
previous generation's rows in ``segments_history`` (``valid_to = D``), and writes
``generation_review`` and ``segment_migration`` for the generation that ended.

Between cuts, a nightly run only places customers that have no segment yet (in
``customer_scores`` at ``D`` but not in ``segments_current``) with the generation's *frozen*
rules (a config change takes effect at the next cut), and leaves everyone else unchanged.

Tables (see :mod:`core.tables`): ``segments_current`` (one row per customer, current
generation), ``segments_history`` (SCD 2: one row per customer and generation; ``valid_from``
inclusive, ``valid_to`` exclusive and null while current; a customer's segment never changes
inside a generation), ``segment_generations``, ``generation_review``, ``segment_migration``.

Closing the loop (``generation_review``, per segment of the generation that ended on ``D``):
``predicted_net_value`` = sum of ``value_at_assignment``; ``actual_net_value`` = net amount of
the customers' orders with ``assigned_as_of < order_date <= min(D, assigned_as_of + horizon)``;
``actual_to_predicted`` their ratio; ``horizon_coverage`` = mean share of the prediction horizon
that window covers (1.0 when the generation lasted the horizon and the customer was placed at
its start; lower for newcomers placed late, whose ratio is then expected below 1).
``segment_migration`` counts customers by (segment in the ended generation, segment in the new
one) over every customer of either: ``(none)`` as from_segment for customers first segmented in
the new generation, ``(gone)`` as to_segment for customers missing from the new scores. The
counts sum to the number of customers in either generation.

Idempotent and crash-safe: re-running a date cuts nothing twice (a generation cut on ``D`` is
kept) and places nobody twice, and writes nothing when there is nothing to place. The cut writes
``segment_generations`` last: a run that dies before that redoes the whole cut on re-run (every
other write of a cut replaces its partitions). A nightly placement appends to
``segments_history`` first, then ``segments_current``; if a run dies in between, the next run
(same date or later) finds those customers still without a current row, takes their rows from
history as recorded, and does not append them again.

Cost: a cut joins the scores with ``customer_features`` (one shuffle join) and reads them from a
local checkpoint (cut points, counts, writes); a nightly run is one anti-join of the scores with
``segments_current`` on ``customer_id``, and touches only the newcomers after that (their
features are picked with a broadcast semi-join, so ``customer_features`` is not shuffled).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from core.config import DORMANT, GONE, NEW, NO_SEGMENT, SegmentsConf
from core.dates import add_months
from core.errors import UserError
from core.results import StageResult, omitted_when_none
from core.storage import Storage
from core.tables import (CUSTOMER_FEATURES, CUSTOMER_SCORES, GENERATION_REVIEW, SEGMENT_GENERATIONS,
                         SEGMENT_MIGRATION, SEGMENTS_CURRENT, SEGMENTS_HISTORY)
from pipelines.identity import read_orders
from pipelines.maintenance import dated_partition

log = logging.getLogger(__name__)

PRECEDENCE = (NEW, DORMANT, "value bands")
DEFINITION_VERSION = 1


class SegmentsError(UserError, ValueError):
    """Segments cannot be computed; the message says what to run or change."""


# --------------------------------------------------------------------------------------------
# Rules (small, plain Python; frozen per generation as JSON)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Band:
    name: str
    lower: float | None            # as configured: quantile or amount; None for the bottom band
    cut_point: float | None        # value threshold used for assignment; None: band takes no one by value
    inclusive: bool                # value >= cut_point (amounts) or value > cut_point (quantiles)


@dataclass(frozen=True)
class SegmentRules:
    band_method: str
    bands: tuple[Band, ...]
    new_customer_days: int
    dormant_p_alive: float
    quantile_relative_error: float

    def to_json(self) -> str:
        payload = {"version": DEFINITION_VERSION, "precedence": list(PRECEDENCE), **asdict(self)}
        return json.dumps(payload, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SegmentRules":
        data = json.loads(text)
        if data.get("version") != DEFINITION_VERSION:
            raise SegmentsError(f"segment_generations.definition has version {data.get('version')}, this engine "
                                f"reads version {DEFINITION_VERSION}; cut a new generation with --new-generation")
        return cls(band_method=data["band_method"], bands=tuple(Band(**b) for b in data["bands"]),
                   new_customer_days=int(data["new_customer_days"]), dormant_p_alive=float(data["dormant_p_alive"]),
                   quantile_relative_error=float(data["quantile_relative_error"]))


def rules_from_conf(conf: SegmentsConf) -> SegmentRules:
    """Rules as configured; quantile cut points are still unknown (see :func:`freeze_cut_points`)."""
    is_value = conf.band_method == "value"
    bands = tuple(Band(name=b.name, lower=b.lower, cut_point=(b.lower if is_value else None),
                       inclusive=is_value) for b in conf.bands)
    return SegmentRules(band_method=conf.band_method, bands=bands, new_customer_days=conf.new_customer_days,
                        dormant_p_alive=conf.dormant_p_alive, quantile_relative_error=conf.quantile_relative_error)


# --------------------------------------------------------------------------------------------
# Column functions
# --------------------------------------------------------------------------------------------
def is_new_customer(n_purchase_days: Column, first_order_date: Column, as_of_date: dt.date,
                    new_customer_days: int) -> Column:
    """One purchase day, within ``new_customer_days`` days up to the as-of date (false if unknown)."""
    if new_customer_days <= 0:
        return F.lit(False)
    recent = F.datediff(F.lit(as_of_date), first_order_date) < F.lit(new_customer_days)
    return F.coalesce((n_purchase_days == 1) & recent, F.lit(False))


def is_dormant(p_alive: Column, dormant_p_alive: float) -> Column:
    return p_alive < F.lit(float(dormant_p_alive))


def value_band(value: Column, bands: Sequence[Band]) -> Column:
    """Name of the first band whose cut point the value reaches; the last band otherwise."""
    expr = None
    for band in bands[:-1]:
        if band.cut_point is None:   # no cut point (nobody to band at the cut): band stays empty
            continue
        cut = F.lit(float(band.cut_point))
        reaches = value >= cut if band.inclusive else value > cut
        expr = F.when(reaches, F.lit(band.name)) if expr is None else expr.when(reaches, F.lit(band.name))
    bottom = F.lit(bands[-1].name)
    return bottom if expr is None else expr.otherwise(bottom)


def segment_of(value: Column, p_alive: Column, is_new: Column, rules: SegmentRules) -> Column:
    """The segment by the documented precedence: new, dormant, then value bands."""
    return (F.when(is_new, F.lit(NEW))
            .when(is_dormant(p_alive, rules.dormant_p_alive), F.lit(DORMANT))
            .otherwise(value_band(value, rules.bands)))


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------
def with_lifecycle_inputs(scores_df: DataFrame, features_df: DataFrame, as_of_date: dt.date,
                          new_customer_days: int) -> DataFrame:
    """customer_id, value, p_alive, is_new: scores joined with the features that define ``new``."""
    lifecycle_df = features_df.select("customer_id", "n_purchase_days", "first_order_date")
    return (scores_df.select("customer_id", F.col("predicted_net_value").alias("value"), "p_alive")
            .join(lifecycle_df, on="customer_id", how="left")
            .select("customer_id", "value", "p_alive",
                    is_new_customer(F.col("n_purchase_days"), F.col("first_order_date"), as_of_date,
                                    new_customer_days).alias("is_new")))


def freeze_cut_points(tagged_df: DataFrame, rules: SegmentRules) -> SegmentRules:
    """Quantile cut points over the customers the value bands apply to (a tiny driver statistic)."""
    if rules.band_method != "quantile":
        return rules
    banded_df = tagged_df.where(~F.col("is_new") & ~is_dormant(F.col("p_alive"), rules.dormant_p_alive))
    probabilities = [float(b.lower) for b in rules.bands[:-1]]
    cuts = banded_df.approxQuantile("value", probabilities, rules.quantile_relative_error) if probabilities else []
    if len(cuts) != len(probabilities):   # nobody to band: every customer is new or dormant
        cuts = [None] * len(probabilities)
    bands = tuple(replace(b, cut_point=(None if c is None else float(c)))
                  for b, c in zip(rules.bands[:-1], cuts)) + (rules.bands[-1],)
    return replace(rules, bands=bands)


def with_segment(tagged_df: DataFrame, rules: SegmentRules) -> DataFrame:
    return tagged_df.withColumn("segment", segment_of(F.col("value"), F.col("p_alive"), F.col("is_new"), rules))


def history_rows(assigned_df: DataFrame, generation_id: int, as_of_date: dt.date, assignment: str) -> DataFrame:
    """``segments_history`` rows (open: valid_to null) from customers carrying a segment."""
    return assigned_df.select(
        "customer_id", "segment", F.lit(generation_id).cast("int").alias("generation_id"),
        F.lit(as_of_date).alias("valid_from"), F.lit(None).cast("date").alias("valid_to"),
        F.col("value").alias("value_at_assignment"), F.col("p_alive").alias("p_alive_at_assignment"),
        F.lit(as_of_date).alias("assigned_as_of"), F.lit(assignment).alias("assignment"))


def current_rows(history_df: DataFrame) -> DataFrame:
    return history_df.select(*SEGMENTS_CURRENT.columns)


def migration_matrix(from_df: DataFrame, to_df: DataFrame, from_generation: int, to_generation: int) -> DataFrame:
    """Customers by (from_segment, to_segment) over every customer of either generation."""
    pairs_df = (from_df.select("customer_id", F.col("segment").alias("from_segment"))
                .join(to_df.select("customer_id", F.col("segment").alias("to_segment")), on="customer_id",
                      how="full"))
    return (pairs_df
            .select(F.coalesce("from_segment", F.lit(NO_SEGMENT)).alias("from_segment"),
                    F.coalesce("to_segment", F.lit(GONE)).alias("to_segment"))
            .groupBy("from_segment", "to_segment").agg(F.count(F.lit(1)).alias("customers"))
            .select(F.lit(to_generation).cast("int").alias("to_generation"),
                    F.lit(from_generation).cast("int").alias("from_generation"),
                    "from_segment", "to_segment", "customers"))


def generation_review(history_df: DataFrame, orders_df: DataFrame, generation_id: int, valid_from: dt.date,
                      valid_to: dt.date, horizon_months: int) -> DataFrame:
    """Per segment of an ended generation: predicted vs actual net revenue (module docstring)."""
    window_end = F.least(F.lit(valid_to), F.add_months(F.col("assigned_as_of"), horizon_months))
    horizon_days = F.datediff(F.add_months(F.col("assigned_as_of"), horizon_months), F.col("assigned_as_of"))
    customers_df = history_df.select(
        "customer_id", "segment", "value_at_assignment", "assigned_as_of",
        F.least(F.lit(1.0), F.greatest(F.lit(0.0), F.datediff(window_end, F.col("assigned_as_of"))
                                       / horizon_days)).alias("coverage"),
        window_end.alias("window_end"))
    period_orders_df = (orders_df
                        .where((F.col("order_date") > F.lit(valid_from)) & (F.col("order_date") <= F.lit(valid_to)))
                        .select(F.col("customer_id").alias("o_customer_id"), "order_date", "net_amount"))
    joined_df = customers_df.join(
        period_orders_df,
        on=[F.col("customer_id") == F.col("o_customer_id"), F.col("order_date") > F.col("assigned_as_of"),
            F.col("order_date") <= F.col("window_end")],
        how="left")
    per_customer_df = joined_df.groupBy("customer_id", "segment", "value_at_assignment", "coverage").agg(
        F.count("o_customer_id").alias("orders"),
        F.coalesce(F.sum("net_amount"), F.lit(0.0)).alias("net"))
    predicted = F.sum("value_at_assignment")
    actual = F.sum("net")
    return (per_customer_df.groupBy("segment").agg(
        F.count(F.lit(1)).alias("customers"),
        predicted.alias("predicted_net_value"),
        actual.alias("actual_net_value"),
        F.sum("orders").alias("actual_orders"),
        F.count_if(F.col("orders") > 0).alias("buyers"),
        F.when(predicted != 0, actual / predicted).alias("actual_to_predicted"),
        F.avg("coverage").alias("horizon_coverage"))
        .select(F.lit(generation_id).cast("int").alias("generation_id"), "segment",
                F.lit(valid_from).alias("valid_from"), F.lit(valid_to).alias("valid_to"),
                *GENERATION_REVIEW.columns[4:]))


# --------------------------------------------------------------------------------------------
# Stage runner
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentsResult(StageResult):
    """What :func:`run_segments` did: a generation cut, or newcomers placed in the current one."""
    as_of_date: dt.date
    generation_id: int
    new_generation: bool                   # whether this run cut the generation
    customers_placed: int
    placed_by_segment: dict[str, int]
    segment_counts: dict[str, int]         # every current customer
    customers: int
    previous_generation: int | None = None            # a cut: the generation it ended (None: the first)
    cut_points: dict[str, float] | None = None        # a cut: the frozen value cut points
    migrated_customers: int | None = omitted_when_none()   # a cut after an earlier generation
    note: str | None = omitted_when_none()

    def asdict(self) -> dict[str, Any]:
        out = super().asdict()
        if not self.new_generation:     # keys a placement run never had
            out.pop("previous_generation")
            out.pop("cut_points")
        return out

    def summary_line(self) -> str:
        action = "cut generation" if self.new_generation else "placed newcomers in generation"
        line = (f"{action} {self.generation_id}: {self.customers_placed:,} placed {self.placed_by_segment}; "
                f"segments_current: {self.customers:,} customers {self.segment_counts}")
        return f"{line} (note: {self.note})" if self.note else line


def _scores_at(storage: Storage, as_of_date: dt.date) -> tuple[DataFrame, int]:
    """customer_scores at D and their horizon; fails with the command to run when missing."""
    scores_df, first = dated_partition(storage, CUSTOMER_SCORES.name, as_of_date, SegmentsError,
                                       f"run `cvseg score --as-of {as_of_date}` first", probe="horizon_months")
    return scores_df, int(first["horizon_months"])


def _features_at(storage: Storage, as_of_date: dt.date) -> DataFrame:
    return dated_partition(storage, CUSTOMER_FEATURES.name, as_of_date, SegmentsError,
                           f"run `cvseg features --as-of {as_of_date}` first (segments read n_purchase_days and "
                           "first_order_date)")[0]


def _current_generation(storage: Storage) -> dict[str, Any] | None:
    """The open row of ``segment_generations`` (a tiny table) as a dict, or None before the first cut."""
    if not storage.exists(SEGMENT_GENERATIONS):
        return None
    rows = storage.read(SEGMENT_GENERATIONS).orderBy(F.col("generation_id").desc()).limit(1).collect()
    return rows[0].asDict(recursive=True) if rows else None


def _segment_counts(df: DataFrame) -> dict[str, int]:
    return {r["segment"]: int(r["n"]) for r in df.groupBy("segment").agg(F.count(F.lit(1)).alias("n")).collect()}


def run_segments(storage: Storage, as_of_date: dt.date, conf: SegmentsConf,
                 new_generation: bool = False) -> SegmentsResult:
    """Cut a generation when one is due (or asked for), otherwise place customers without a segment."""
    current = _current_generation(storage)
    if current is not None and as_of_date < current["valid_from"]:
        raise SegmentsError(
            f"as-of {as_of_date} is before the current segment generation {current['generation_id']} "
            f"(cut on {current['valid_from']}); segments only move forward: use a date on or after "
            f"{current['valid_from']}")
    already_cut_today = current is not None and current["valid_from"] == as_of_date
    due = current is None or as_of_date >= add_months(current["valid_from"], conf.generation_months)
    if (due or new_generation) and not already_cut_today:
        return _cut_generation(storage, as_of_date, conf, current)
    summary = _place_newcomers(storage, as_of_date, current)
    if new_generation and already_cut_today:
        summary = replace(summary, note=f"generation {current['generation_id']} was already cut on {as_of_date}; kept")
    return summary


def _cut_generation(storage: Storage, as_of_date: dt.date, conf: SegmentsConf,
                    previous: dict[str, Any] | None) -> SegmentsResult:
    scores_df, horizon_months = _scores_at(storage, as_of_date)
    features_df = _features_at(storage, as_of_date)
    generation_id = 1 if previous is None else int(previous["generation_id"]) + 1
    # materialised once: the cut points and every write below read the same rows
    tagged_df = (with_lifecycle_inputs(scores_df, features_df, as_of_date, conf.new_customer_days)
                 .localCheckpoint(eager=True))
    rules = freeze_cut_points(tagged_df, rules_from_conf(conf))
    new_history_df = history_rows(tagged_df.transform(with_segment, rules), generation_id, as_of_date, "generation")
    counts = _segment_counts(new_history_df)
    migrated = None
    history_df = new_history_df
    replaced = [generation_id]
    if previous is not None:
        previous_id = int(previous["generation_id"])
        # the ended generation as history holds it (intact even if a crashed cut already closed it)
        ended_df = storage.read(SEGMENTS_HISTORY).where(F.col("generation_id") == F.lit(previous_id))
        review_df = generation_review(ended_df, read_orders(storage), previous_id, previous["valid_from"],
                                      as_of_date, int(previous["horizon_months"]))
        storage.replace_partitions(GENERATION_REVIEW, review_df, partitions={"generation_id": [previous_id]})
        # one row per (from, to) segment pair: computed once, summed here and written from the rows
        migration = migration_matrix(ended_df, new_history_df, previous_id, generation_id).collect()
        storage.replace_partitions(SEGMENT_MIGRATION,
                                   storage.spark.createDataFrame(migration, SEGMENT_MIGRATION.schema),
                                   partitions={"to_generation": [generation_id]})
        history_df = ended_df.withColumn("valid_to", F.lit(as_of_date)).unionByName(new_history_df)
        replaced.append(previous_id)
        migrated = sum(int(r["customers"]) for r in migration)
    storage.replace_partitions(SEGMENTS_HISTORY, history_df, partitions={"generation_id": replaced})
    storage.overwrite(SEGMENTS_CURRENT, current_rows(new_history_df))
    _write_generation(storage, generation_id, as_of_date, rules, horizon_months, counts, previous)
    tagged_df.unpersist()
    return SegmentsResult(as_of_date, generation_id, True, sum(counts.values()), counts, counts, sum(counts.values()),
                          previous_generation=None if previous is None else int(previous["generation_id"]),
                          cut_points={b.name: b.cut_point for b in rules.bands}, migrated_customers=migrated)


def _write_generation(storage: Storage, generation_id: int, as_of_date: dt.date, rules: SegmentRules,
                      horizon_months: int, counts: dict[str, int], previous: dict[str, Any] | None) -> None:
    """Close the previous generation and add the new one: the write that makes the cut count."""
    spark = storage.spark
    new_df = spark.createDataFrame(
        [(generation_id, as_of_date, None, as_of_date, rules.band_method, rules.to_json(), horizon_months,
          sum(counts.values()), counts)], SEGMENT_GENERATIONS.schema)
    earlier_df = storage.read_or_empty(SEGMENT_GENERATIONS).where(F.col("generation_id") < F.lit(generation_id))
    if previous is not None:
        earlier_df = earlier_df.withColumn(
            "valid_to", F.when(F.col("generation_id") == F.lit(int(previous["generation_id"])), F.lit(as_of_date))
            .otherwise(F.col("valid_to")))
    storage.overwrite(SEGMENT_GENERATIONS, earlier_df.unionByName(new_df))


def _place_newcomers(storage: Storage, as_of_date: dt.date, generation: dict[str, Any]) -> SegmentsResult:
    generation_id = int(generation["generation_id"])
    rules = SegmentRules.from_json(generation["definition"])
    scores_df, _ = _scores_at(storage, as_of_date)
    current_df = storage.read(SEGMENTS_CURRENT)
    # the one customer-sized step of a nightly run: scores anti-join segmented customers
    newcomers_df = (scores_df.select("customer_id", "predicted_net_value", "p_alive")
                    .join(current_df.select("customer_id"), on="customer_id", how="left_anti")
                    .localCheckpoint(eager=True))
    # the night's newcomers are few: broadcast their ids so the features are filtered, not shuffled
    newcomer_features_df = _features_at(storage, as_of_date).join(
        F.broadcast(newcomers_df.select("customer_id")), on="customer_id", how="left_semi")
    # materialised so the count and both writes read one result
    placed_df = (with_lifecycle_inputs(newcomers_df, newcomer_features_df, as_of_date, rules.new_customer_days)
                 .transform(with_segment, rules)
                 .transform(history_rows, generation_id, as_of_date, "placement")
                 .localCheckpoint(eager=True))
    placed_counts = _segment_counts(placed_df)
    if placed_counts:
        # A run that died between the two appends left its rows in history only: those customers
        # keep the assignment history recorded (whatever date this run is), and are not appended
        # again. Picked from this generation's placements with the newcomers' ids broadcast.
        orphans_df = (storage.read(SEGMENTS_HISTORY)
                      .where((F.col("generation_id") == F.lit(generation_id)) & (F.col("assignment") == "placement"))
                      .join(F.broadcast(newcomers_df.select("customer_id")), on="customer_id", how="left_semi")
                      .localCheckpoint(eager=True))
        fresh_df = placed_df.join(orphans_df.select("customer_id"), on="customer_id", how="left_anti")
        if orphans_df.limit(1).count():
            placed_counts = _segment_counts(fresh_df.unionByName(orphans_df))
        if fresh_df.limit(1).count():
            storage.append(SEGMENTS_HISTORY, fresh_df)
        storage.append(SEGMENTS_CURRENT, current_rows(fresh_df.unionByName(orphans_df)))
        orphans_df.unpersist()
    counts = _segment_counts(storage.read(SEGMENTS_CURRENT))
    placed_df.unpersist()
    newcomers_df.unpersist()
    return SegmentsResult(as_of_date, generation_id, False, sum(placed_counts.values()), placed_counts, counts,
                          sum(counts.values()))
