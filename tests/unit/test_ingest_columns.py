"""Column functions of the ingest: amounts as Japanese exports write them, local timestamps."""
from datetime import date, datetime

from chispa import assert_column_equality
from pyspark.sql import functions as F

from pipelines.ingest import is_non_numeric_amount, local_date, parse_amount, parse_timestamp


def test_parse_amount_yen_formats_and_non_numeric(spark):
    rows = [
        ("1,234", 1234.0, False), ("¥1,234", 1234.0, False), ("￥1,234", 1234.0, False),
        ("1234円", 1234.0, False), (" 12 345 ", 12345.0, False), ("\\980", 980.0, False),  # cp932 ¥ = 0x5C
        ("１，２３４", 1234.0, False), ("▲500", -500.0, False), ("-12.5", -12.5, False),
        ("abc", None, True), ("NaN", None, True), ("1e3", None, True), ("12-3", None, True),
        ("", None, False), (None, None, False),
    ]
    df = (spark.createDataFrame(rows, "text string, expected double, expected_flag boolean")
          .withColumn("amount", parse_amount(F.col("text")))
          .withColumn("flag", is_non_numeric_amount(F.col("text"))))
    assert_column_equality(df, "amount", "expected")
    assert_column_equality(df, "flag", "expected_flag")


def test_parse_timestamp_formats_zone_and_business_day(spark):
    rows = [
        # 08:00 in Tokyo is 23:00 UTC the day before; the business day stays the Tokyo day
        ("2024/01/05 08:00:00", datetime(2024, 1, 4, 23, 0), date(2024, 1, 5)),
        ("2024/02/01", datetime(2024, 1, 31, 15, 0), date(2024, 2, 1)),          # second format
        (" 2024/03/01 10:30:00 ", datetime(2024, 3, 1, 1, 30), date(2024, 3, 1)),  # blanks trimmed
        ("2024-13-45", None, None), ("", None, None), (None, None, None),
    ]
    df = (spark.createDataFrame(rows, "text string, expected timestamp, expected_day date")
          .withColumn("ts", parse_timestamp(F.col("text"), ["yyyy/MM/dd HH:mm:ss", "yyyy/MM/dd"], "Asia/Tokyo"))
          .withColumn("day", local_date(F.col("ts"), "Asia/Tokyo")))
    assert_column_equality(df, "ts", "expected")
    assert_column_equality(df, "day", "expected_day")
