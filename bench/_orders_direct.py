"""Benchmark shortcut: the generator's clean orders written straight into the ``orders`` table.

The scale benchmarks of the later stages (models at 1M/2M/4M customers, the nightly run) need an
``orders`` table of that size. Building it through ``cvseg ingest`` measures ingest again and takes
most of the benchmark's time, so this writes the rows that ingest would accept from a defect-free
export (``dirty_share=0``): same parsing of the local timestamp, same business-day and month,
same amounts. ``python bench/_orders_direct.py`` checks, at 3,000 customers, that these rows equal
what ingest writes from the same clean export (lineage columns aside). Never used by the engine.
"""
from __future__ import annotations

import datetime as dt

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from core.storage import Storage
from core.tables import ORDERS
from datagen.generate import GeneratorParams, generate_orders
from pipelines.ingest import local_date, parse_timestamp

SOURCE_TZ = "Asia/Tokyo"          # the generator's wall-clock zone (conf/examples/synthetic.yaml)
TIMESTAMP_FORMAT = "yyyy/MM/dd HH:mm:ss"


def direct_orders(spark: SparkSession, n_customers: int, seed: int, end_date: dt.date,
                  business_tz: str = SOURCE_TZ, params: GeneratorParams = GeneratorParams()) -> DataFrame:
    """Canonical ``orders`` rows of a clean generated export (lazy)."""
    raw_df = generate_orders(spark, n_customers, seed, end_date, params=params, dirty_share=0.0)
    order_ts = parse_timestamp(F.col("order_datetime"), (TIMESTAMP_FORMAT,), SOURCE_TZ)
    gross = F.col("amount").cast("double")
    is_cancelled = F.col("status") == "cancelled"
    cancelled = F.when(is_cancelled, gross).otherwise(
        F.least(gross, F.greatest(F.lit(0.0), F.col("cancelled_amount").cast("double"))))
    return (raw_df
            .withColumn("order_ts", order_ts)
            .withColumn("order_date", local_date(F.col("order_ts"), business_tz))
            .withColumn("gross_amount", gross)
            .withColumn("is_cancelled", is_cancelled | ((cancelled > 0) & (cancelled >= gross)))
            .withColumn("cancelled_amount", cancelled)
            .withColumn("net_amount", gross - cancelled)
            .withColumn("extra", F.lit(None).cast("map<string,string>"))
            .withColumn("source_file", F.lit("generated"))
            .withColumn("source_row", F.monotonically_increasing_id() + 1)
            .withColumn("ingest_run_id", F.lit("bench-direct"))
            .withColumn("order_month", F.date_format("order_date", "yyyy-MM"))
            .select(*ORDERS.columns))


def write_orders_direct(spark: SparkSession, storage: Storage, n_customers: int, seed: int,
                        end_date: dt.date, business_tz: str = SOURCE_TZ,
                        params: GeneratorParams = GeneratorParams()) -> None:
    storage.append(ORDERS, direct_orders(spark, n_customers, seed, end_date, business_tz, params))


def _check(n_customers: int = 3000, seed: int = 11) -> None:
    """Direct rows == ingest's rows for the same clean export (all but lineage columns)."""
    import tempfile

    from core.config import load_config
    from core.spark import build_spark
    from datagen.generate import write_export
    from pipelines.ingest import run_ingest

    end = dt.date(2026, 9, 30)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [f"storage.warehouse={tmp}/wh"])
        spark = build_spark(config.spark, f"{tmp}/wh")
        storage = Storage(spark, f"{tmp}/wh", "deltalake")
        path = write_export(generate_orders(spark, n_customers, seed, end, dirty_share=0.0), f"{tmp}/x", "parquet")
        from pathlib import Path
        conf = load_config(Path(__file__).resolve().parents[1] / "conf" / "examples" / "synthetic.yaml",
                           [f"storage.warehouse={tmp}/wh", "source.format=parquet"])
        run_ingest(spark, storage, conf.source, conf.validation, conf.business.timezone, end, path=path)
        lineage = ["source_file", "source_row", "ingest_run_id", "extra"]   # extra: null in both
        ingested = storage.read(ORDERS).drop(*lineage)
        direct = direct_orders(spark, n_customers, seed, end, conf.business.timezone).drop(*lineage)
        only_ingest, only_direct = ingested.exceptAll(direct).count(), direct.exceptAll(ingested).count()
        print(f"rows: ingest {ingested.count():,}, direct {direct.count():,}; "
              f"only in ingest {only_ingest}, only in direct {only_direct}")
        assert only_ingest == only_direct == 0


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _check()
