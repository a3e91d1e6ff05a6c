"""`cvseg show` says when its output was cut and takes `--limit all`; `cvseg dump` writes a whole
table to one CSV file (or a parquet folder) through Spark."""
from __future__ import annotations

import datetime as dt
import json

import pandas as pd
import pytest

from core.config import dump_config, load_config
from core.tables import ORDERS_QUARANTINE
from jobs.cli import main

D = dt.date(2026, 9, 30)


@pytest.fixture()
def conf(spark, storage, tmp_path):
    rows = [(f"f{i % 2}.csv", i, "missing_amount", ["missing_amount"], "amount is empty", f"O{i:03d}",
             f"顧客{i:03d}", {"amount": "", "note": f'say "{i}", twice'}, "run-1", D, None) for i in range(25)]
    storage.append("orders_quarantine", spark.createDataFrame(rows, ORDERS_QUARANTINE.schema))
    config = load_config(None, [f"storage.warehouse={storage.warehouse}", f"storage.backend={storage.backend}",
                                "spark.master=null", "source.path=unused"])
    return str(dump_config(config, tmp_path / "conf.yaml"))


def test_show_says_when_it_cut_the_output_and_prints_all_on_request(conf, capsys):
    assert main(["show", "orders_quarantine", "--conf", conf]) == 0
    out = capsys.readouterr().out
    assert "orders_quarantine: 20 row(s) shown; more rows exist: --limit N, --limit all, or `cvseg dump" in out

    assert main(["show", "orders_quarantine", "--conf", conf, "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 21 and "(cut after 20 rows; more rows exist" in captured.err

    assert main(["show", "orders_quarantine", "--conf", conf, "--format", "csv", "--limit", "all"]) == 0
    captured = capsys.readouterr()
    assert "O024" in captured.out and not captured.err

    assert main(["show", "orders_quarantine", "--conf", conf, "--limit", "25"]) == 0
    assert "25 row(s) shown\n" in capsys.readouterr().out      # exactly all: nothing said to be cut
    with pytest.raises(SystemExit) as zero:
        main(["show", "orders_quarantine", "--conf", conf, "--limit", "0"])
    assert zero.value.code == 2 and "0 prints nothing" in capsys.readouterr().err


def test_dump_writes_the_whole_table_as_one_csv_or_a_parquet_folder(spark, conf, tmp_path, capsys):
    out = tmp_path / "quarantine.csv"
    assert main(["dump", "orders_quarantine", "--conf", conf, "--out", str(out), "--encoding", "cp932"]) == 0
    assert "25 rows of orders_quarantine -> " in capsys.readouterr().out
    table = pd.read_csv(out, encoding="cp932", dtype=str, keep_default_na=False)
    assert list(table.columns) == list(ORDERS_QUARANTINE.columns) and len(table) == 25
    assert table["customer_id"].iloc[0] == "顧客000"
    assert json.loads(table["raw"].iloc[3]) == {"amount": "", "note": 'say "3", twice'}   # maps as JSON

    assert main(["dump", "orders_quarantine", "--conf", conf, "--out", str(out)]) == 2   # exists
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["dump", "orders_quarantine", "--conf", conf, "--out", str(out), "--overwrite",
                 "--columns", "source_row"]) == 0
    assert pd.read_csv(out).columns.tolist() == ["source_row"]   # replaced, now utf-8 and one column

    folder = tmp_path / "quarantine_parquet"
    assert main(["dump", "orders_quarantine", "--conf", conf, "--out", str(folder), "--format", "parquet",
                 "--where", "source_file = 'f1.csv'", "--columns", "source_row,customer_id"]) == 0
    got = spark.read.parquet(str(folder))
    assert got.columns == ["source_row", "customer_id"] and got.count() == 12
