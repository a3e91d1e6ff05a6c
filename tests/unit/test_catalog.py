"""storage.catalog: every table written is registered in the Spark catalog under its warehouse path,
so `SELECT * FROM <catalog>.<table>` works (Unity Catalog / Glue / Hive on clusters; here the
session's Delta catalog, and Spark's embedded Hive metastore in a temporary folder)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.storage import Storage, StorageError
from tests.conftest import TEST_JVM
from tests.unit.test_storage import _orders_df

ROOT = Path(__file__).resolve().parents[2]


def test_written_tables_are_queryable_by_name(spark, warehouse):
    storage = Storage(spark, str(warehouse), "delta-spark", catalog="cvseg_catalog_test")
    storage.append("orders", _orders_df(spark, [("o1", "c1", "2024-01-05", 10.0)]))
    storage.merge("orders", _orders_df(spark, [("o2", "c2", "2024-02-05", 20.0)]))
    assert storage.catalog_name("orders") == "cvseg_catalog_test.orders"
    rows = spark.sql("SELECT order_id, gross_amount FROM cvseg_catalog_test.orders ORDER BY order_id").collect()
    assert [(r.order_id, r.gross_amount) for r in rows] == [("o1", 10.0), ("o2", 20.0)]
    # the next write is seen through the catalog too: the name points at the path, not a copy
    storage.append("orders", _orders_df(spark, [("o3", "c3", "2024-03-05", 30.0)]))
    assert spark.sql("SELECT count(*) FROM cvseg_catalog_test.orders").first()[0] == 3
    assert not spark.sql("SHOW TABLES IN cvseg_catalog_test LIKE 'customer_scores'").collect()   # only what exists


def test_a_name_registered_at_another_warehouse_is_an_error(spark, tmp_path):
    first = Storage(spark, str(tmp_path / "a"), "delta-spark", catalog="cvseg_catalog_clash")
    first.append("orders", _orders_df(spark, [("o1", "c1", "2024-01-05", 10.0)]))
    second = Storage(spark, str(tmp_path / "b"), "delta-spark", catalog="cvseg_catalog_clash")
    with pytest.raises(StorageError, match="registered at .*/a/orders, not at this warehouse's .*/b/orders"):
        second.append("orders", _orders_df(spark, [("o9", "c9", "2024-01-05", 1.0)]))


def test_the_deltalake_backend_cannot_register(spark, warehouse):
    with pytest.raises(StorageError, match="storage.catalog.*needs the delta-spark backend"):
        Storage(spark, str(warehouse), "deltalake", catalog="cvseg")


def test_tables_stay_registered_in_a_persistent_metastore_across_sessions(tmp_path):
    """Two separate Spark applications on one embedded (Derby) Hive metastore: the second one
    queries by name what the first one wrote through the engine."""
    script = textwrap.dedent('''
        import json, sys
        from core.config import SparkConf
        from core.spark import build_spark
        from core.storage import Storage
        tmp, action = sys.argv[1], sys.argv[2]
        spark = build_spark(SparkConf(master="local[1]", app_name="catalog-test", shuffle_partitions=1,
                                      driver_memory="1g", extra={
            "spark.sql.catalogImplementation": "hive",
            "spark.hadoop.javax.jdo.option.ConnectionURL": f"jdbc:derby:;databaseName={tmp}/metastore_db;create=true",
            "spark.sql.warehouse.dir": f"{tmp}/hive_warehouse", **json.loads(sys.argv[3])}))
        if action == "write":
            from tests.unit.test_storage import _orders_df
            storage = Storage(spark, f"{tmp}/warehouse", "delta-spark", catalog="cvseg")
            storage.append("orders", _orders_df(spark, [("o1", "c1", "2024-01-05", 10.0), ("o2", "c2", "2024-02-05", 20.0)]))
        else:
            print("ROWS", spark.sql("SELECT count(*) FROM cvseg.orders").first()[0])
        spark.stop()
    ''')
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    for action in ("write", "read"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path), action, json.dumps(TEST_JVM)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "ROWS 2" in done.stdout
