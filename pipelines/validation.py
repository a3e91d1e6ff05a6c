"""Data-quality rules as data: each rule is a Column condition (True = the row is bad) and a
stable reason code. ``split_by_rules`` separates good rows from quarantined rows; nothing is
dropped, every row lands on exactly one side.

The rules for order exports live here too (``order_rules``): they read the canonical columns that
:mod:`pipelines.ingest` prepares, and their parameters (run date, tolerance, currencies) come in
as arguments, never from config.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

# Stable reason codes: they are stored in orders_quarantine and counted in ingest_runs.
MALFORMED_ROW = "malformed_row"            # not the header's number of fields: no column can be trusted
MISSING_ORDER_ID = "missing_order_id"
MISSING_CUSTOMER_ID = "missing_customer_id"
UNPARSABLE_TIMESTAMP = "unparsable_timestamp"
FUTURE_TIMESTAMP = "future_timestamp"
MISSING_AMOUNT = "missing_amount"
NON_NUMERIC_AMOUNT = "non_numeric_amount"
NEGATIVE_AMOUNT = "negative_amount"
UNKNOWN_CURRENCY = "unknown_currency"
DUPLICATE_ORDER_CONFLICT = "duplicate_order_conflict"
CANCELLATION_WITHOUT_ORDER = "cancellation_without_order"

REASON_CODES: tuple[str, ...] = (
    MALFORMED_ROW, MISSING_ORDER_ID, MISSING_CUSTOMER_ID, UNPARSABLE_TIMESTAMP, FUTURE_TIMESTAMP, MISSING_AMOUNT,
    NON_NUMERIC_AMOUNT, NEGATIVE_AMOUNT, UNKNOWN_CURRENCY, DUPLICATE_ORDER_CONFLICT,
    CANCELLATION_WITHOUT_ORDER,
)


@dataclass(frozen=True, eq=False)  # eq=False: Column overloads ==, so compare rules by identity
class Rule:
    """``condition`` is True when the row is bad; a null condition counts as "not bad", so write
    conditions that are explicit about nulls. ``detail`` is a fixed text or a Column (per row)."""

    code: str
    condition: Column
    detail: str | Column


def with_rule_results(df: DataFrame, rules: list[Rule], *, details: bool = True) -> DataFrame:
    """Add ``reasons`` (every failing code, in rule order), ``reason`` (the first) and ``detail``
    (the first failing rule's detail); ``reason`` is null and ``reasons`` empty on good rows.

    ``details=False`` leaves ``detail`` out: add it later with :func:`with_rule_details`, e.g. on
    the few rows that failed, once they are cached (on a large scan the per-row message code made
    Spark's generated method too big for the JIT compiler, which then runs it interpreted)."""
    if not rules:
        out_df = (df.withColumn("reasons", F.array().cast("array<string>"))
                  .withColumn("reason", F.lit(None).cast("string")))
        return out_df.withColumn("detail", F.lit(None).cast("string")) if details else out_df
    # Each condition is evaluated once into a flag column; reason, detail and the array read the
    # flags (conditions repeated in three expressions were evaluated three times, parsing included).
    flags = [f"_rule_{i}" for i in range(len(rules))]
    flagged_df = df.select("*", *[F.coalesce(r.condition, F.lit(False)).alias(f) for r, f in zip(rules, flags)])
    reason = F.lit(None).cast("string")
    for rule, flag in reversed(list(zip(rules, flags))):  # built inside out: the first failing rule wins
        reason = F.when(F.col(flag), F.lit(rule.code)).otherwise(reason)
    # "" marks a passing rule; array_remove (unlike a filter lambda) keeps code generation
    failing = [F.when(F.col(flag), F.lit(rule.code)).otherwise(F.lit("")) for rule, flag in zip(rules, flags)]
    out_df = (flagged_df.withColumn("reason", reason)
              .withColumn("reasons", F.when(F.col("reason").isNull(), F.array().cast("array<string>"))
                          .otherwise(F.array_remove(F.array(*failing), ""))))
    out_df = out_df.drop(*flags)
    return with_rule_details(out_df, rules) if details else out_df


def with_rule_details(df: DataFrame, rules: list[Rule]) -> DataFrame:
    """Add ``detail`` from ``reason``: the detail of the first rule with that code (each rule has
    its own code), null on good rows. ``df`` needs the columns the details read."""
    detail = F.lit(None).cast("string")
    for rule in reversed(rules):
        text = rule.detail if isinstance(rule.detail, Column) else F.lit(rule.detail)
        detail = F.when(F.col("reason") == rule.code, text).otherwise(detail)
    return df.withColumn("detail", detail)


def split_by_rules(df: DataFrame, rules: list[Rule]) -> tuple[DataFrame, DataFrame]:
    """(valid_df, quarantine_df): rows failing no rule, and rows failing at least one with
    ``reason``/``reasons``/``detail``. Persist ``df`` first if it is expensive: both sides read it."""
    checked_df = with_rule_results(df, rules)
    is_bad = F.col("reason").isNotNull()
    valid_df = checked_df.filter(~is_bad).drop("reasons", "reason", "detail")
    quarantine_df = checked_df.filter(is_bad)
    return valid_df, quarantine_df


def _blank(col: Column) -> Column:
    return col.isNull() | (F.trim(col) == "")


def order_rules(*, run_date: date, future_tolerance_days: int = 0,
                allowed_currencies: tuple[str, ...] = (), order_id_mapped: bool = True,
                expected_fields: int | None = None, expected_from: str = "the header") -> list[Rule]:
    """Row rules for canonical order rows, in priority order (the first failing one is the reason).

    ``malformed_row`` comes first: a row with more or fewer fields than the header (an unquoted
    delimiter in a product name, a cut line) has its values in the wrong columns, so what the
    other rules would say about it means nothing. ``expected_fields`` (the header's field count)
    and ``expected_from`` (what gives it: "the header", "source.csv.column_names") are for its
    message only.

    Expected columns (prepared by ``pipelines.ingest``): ``_is_malformed`` (the row's field count
    is not the expected one), ``_field_count`` (the row's fields, null if not known),
    ``order_id``, ``customer_id``,
    ``order_ts_text`` (as read), ``order_ts`` (parsed instant), ``order_date``,
    ``amount_text`` (gross as read, for the message), ``gross_amount`` (parsed, null if not a
    number), ``is_amount_missing``, ``is_amount_non_numeric``, ``is_cancellation_line``,
    ``currency``, ``is_order_conflict``, ``conflict_detail``, ``has_target_order``.
    """
    last_day = run_date + timedelta(days=future_tolerance_days)
    hint = " (an unquoted delimiter or a cut line?); fix the export or quote the field"
    if expected_fields is None:
        malformed_detail: str | Column = f"row does not have as many fields as {expected_from}{hint}"
    else:
        # the count is the reader's estimate: one equal to the header's would contradict the flag
        counted = F.col("_field_count").isNotNull() & (F.col("_field_count") != expected_fields)
        malformed_detail = F.when(counted, F.concat(
            F.lit("row has "), F.col("_field_count").cast("string"),
            F.lit(f" fields, {expected_from} has {expected_fields}{hint}"))).otherwise(
            F.lit(f"row does not have the {expected_fields} fields {expected_from} has{hint}"))
    rules: list[Rule] = [Rule(MALFORMED_ROW, F.col("_is_malformed"), malformed_detail)]
    if order_id_mapped:
        rules.append(Rule(MISSING_ORDER_ID, _blank(F.col("order_id")), "order id is empty"))
    rules += [
        Rule(MISSING_CUSTOMER_ID, _blank(F.col("customer_id")), "customer id is empty"),
        Rule(UNPARSABLE_TIMESTAMP, F.col("order_ts").isNull(),
             F.concat(F.lit("order timestamp "),
                      F.coalesce(F.concat(F.lit("'"), F.col("order_ts_text"), F.lit("'")), F.lit("(empty)")),
                      F.lit(" does not match source.timestamp_format"))),
        Rule(FUTURE_TIMESTAMP, F.col("order_date") > F.lit(last_day),
             F.concat(F.lit("order date "), F.col("order_date").cast("string"),
                      F.lit(f" is after {run_date.isoformat()}"
                            + (f" + {future_tolerance_days} days" if future_tolerance_days else "")
                            + ", the day the file was read (or validation.future_cutoff); "
                              "it is read again on that order day"))),
        Rule(MISSING_AMOUNT, F.col("is_amount_missing"), "amount is empty"),
        Rule(NON_NUMERIC_AMOUNT, F.col("is_amount_non_numeric"),
             F.concat(F.lit("amount '"), F.coalesce(F.col("amount_text"), F.lit("")), F.lit("' is not a number"))),
        Rule(NEGATIVE_AMOUNT, ~F.col("is_cancellation_line") & (F.col("gross_amount") < 0),
             F.concat(F.lit("negative amount "), F.col("gross_amount").cast("string"),
                      F.lit(" on a row that is not a cancellation line"))),
    ]
    if allowed_currencies:
        allowed = sorted({c.strip().upper() for c in allowed_currencies})
        rules.append(Rule(
            UNKNOWN_CURRENCY,
            _blank(F.col("currency")) | ~F.upper(F.trim(F.col("currency"))).isin(allowed),
            F.concat(F.lit("currency '"), F.coalesce(F.col("currency"), F.lit("")),
                     F.lit(f"' is not in source.allowed_currencies ({', '.join(allowed)})"))))
    rules += [
        Rule(DUPLICATE_ORDER_CONFLICT, F.col("is_order_conflict"), F.col("conflict_detail")),
        Rule(CANCELLATION_WITHOUT_ORDER, F.col("is_cancellation_line") & ~F.col("has_target_order"),
             "cancellation line with no order of the same customer at or before it"),
    ]
    return rules
