"""Rules as data: split_by_rules puts every row on exactly one side, with all its reasons."""
from datetime import date

from chispa import assert_df_equality
from pyspark.sql import functions as F

from pipelines.validation import Rule, order_rules, split_by_rules, with_rule_details, with_rule_results


def test_split_by_rules_first_reason_all_reasons_and_null_conditions(spark):
    df = spark.createDataFrame(
        [(1, "c1", 10.0), (2, None, 5.0), (3, None, -1.0), (4, "c4", None)],
        "id int, customer_id string, amount double")
    rules = [
        Rule("missing_customer_id", F.col("customer_id").isNull(), "customer id is empty"),
        # null amount -> null condition -> counted as passing (rules must say what they mean)
        Rule("negative_amount", F.col("amount") < 0,
             F.concat(F.lit("amount "), F.col("amount").cast("string"))),
    ]
    valid_df, quarantine_df = split_by_rules(df, rules)

    assert_df_equality(valid_df, df.filter(F.col("id").isin(1, 4)), ignore_row_order=True)
    expected_df = spark.createDataFrame(
        [(2, "missing_customer_id", ["missing_customer_id"], "customer id is empty"),
         (3, "missing_customer_id", ["missing_customer_id", "negative_amount"], "customer id is empty")],
        "id int, reason string, reasons array<string>, detail string")
    assert_df_equality(quarantine_df.select("id", "reason", "reasons", "detail"), expected_df,
                       ignore_row_order=True, ignore_nullable=True)


def test_rule_detail_column_and_no_rules(spark):
    df = spark.createDataFrame([(1, -3.0)], "id int, amount double")
    checked = with_rule_results(df, [Rule("negative_amount", F.col("amount") < 0,
                                          F.concat(F.lit("amount "), F.col("amount").cast("string")))]).first()
    assert (checked["reason"], checked["detail"]) == ("negative_amount", "amount -3.0")
    untouched = with_rule_results(df, []).first()
    assert untouched["reasons"] == [] and untouched["reason"] is None


def test_order_rules_codes_and_currency_only_when_configured():
    codes = [r.code for r in order_rules(run_date=date(2024, 3, 31))]
    assert codes == ["malformed_row", "missing_order_id", "missing_customer_id", "unparsable_timestamp",
                     "future_timestamp", "missing_amount", "non_numeric_amount", "negative_amount",
                     "duplicate_order_conflict", "cancellation_without_order"]
    with_currency = [r.code for r in order_rules(run_date=date(2024, 3, 31), allowed_currencies=("JPY",),
                                                 order_id_mapped=False)]
    assert "unknown_currency" in with_currency and "missing_order_id" not in with_currency


def test_rule_details_added_later_equal_the_first_failing_rules_detail(spark):
    df = spark.createDataFrame([(1, None, -3.0), (2, "c2", -1.0), (3, "c3", 4.0)],
                               "id int, customer_id string, amount double")
    rules = [Rule("missing_customer_id", F.col("customer_id").isNull(), "customer id is empty"),
             Rule("negative_amount", F.col("amount") < 0, F.concat(F.lit("amount "), F.col("amount").cast("string")))]
    at_once = with_rule_results(df, rules).select("id", "reason", "reasons", "detail")
    later_df = with_rule_results(df, rules, details=False)
    assert "detail" not in later_df.columns
    assert_df_equality(with_rule_details(later_df, rules).select("id", "reason", "reasons", "detail"), at_once,
                       ignore_row_order=True)


def test_malformed_row_rule_comes_first_and_says_how_many_fields(spark):
    df = spark.createDataFrame(
        [(1, True, 10, "O1", "C1"), (2, True, None, None, None), (3, True, 9, "O3", "C3"),
         (4, False, None, "O4", "C4")],
        "id int, _is_malformed boolean, _field_count int, order_id string, customer_id string")
    rules = [r for r in order_rules(run_date=date(2024, 3, 31), expected_fields=9)
             if r.code in ("malformed_row", "missing_order_id", "missing_customer_id")]
    got = {r.id: (r.reason, r.reasons, r.detail) for r in with_rule_results(df, rules).collect()}
    hint = " (an unquoted delimiter or a cut line?); fix the export or quote the field"
    assert got == {
        1: ("malformed_row", ["malformed_row"], "row has 10 fields, the header has 9" + hint),
        # other rules still list what they see, but the reason is malformed_row
        2: ("malformed_row", ["malformed_row", "missing_order_id", "missing_customer_id"],
            "row does not have the 9 fields the header has" + hint),
        3: ("malformed_row", ["malformed_row"], "row does not have the 9 fields the header has" + hint),
        4: (None, [], None)}
