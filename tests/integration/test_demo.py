"""Both demos of the README (`cvseg demo`, `cvseg demo --dataset cdnow`) and every "Go on with"
command each prints, run as a user would run them (in this test's Spark session)."""
from __future__ import annotations

import shlex

import pytest

from jobs.cli import main

pytestmark = pytest.mark.slow   # minutes: started first (tests/conftest.py)


def _printed_commands(out: str) -> list[list[str]]:
    """The `cvseg ...` lines after "Go on with", without their trailing comments."""
    tail = out.split("Go on with, e.g.:", 1)[1]
    return [shlex.split(line.split("#", 1)[0])[1:] for line in tail.splitlines() if line.strip().startswith("cvseg ")]


@pytest.mark.parametrize("dataset, options", [
    ("synthetic", ["--customers", "600"]),
    ("cdnow", []),   # the README's demo: 2,357 customers, 1997-01-01..1998-06-30
])
def test_demo_then_every_command_it_prints(spark, tmp_path, capsys, dataset, options):
    demo_dir = tmp_path / "demo"
    # the test's session (spark.master null); one purchase model keeps the backtest short
    settings = ["--set", "spark.master=null", "--set", "models.purchase_models=[bgnbd]",
                "--set", "storage.backend=deltalake"]   # the nightly run on delta-spark: test_nightly_run
    assert main(["demo", "--dataset", dataset, "--dir", str(demo_dir), *options, *settings]) == 0
    out = capsys.readouterr().out
    assert "6 step(s) ran, 0 skipped" in out and "rows -> " in out
    assert "never seen before" not in out        # the example conf knows every status the generator writes
    commands = _printed_commands(out)
    assert [c[0] for c in commands] == ["run", "show", "show", "show", "export", "models", "report", "backtest"]

    printed = {}
    for argv in commands:
        assert main(argv) == 0, f"`cvseg {shlex.join(argv)}` failed"
        printed[argv[0] + (f" {argv[1]}" if argv[0] == "show" else "")] = capsys.readouterr().out
    assert "0 step(s) ran, 7 skipped" in printed["run"]   # maintain too: the first comes a week in
    assert "segments_current" in printed["show segments_current"]
    assert (demo_dir / "crm").is_dir() and any((demo_dir / "crm").glob("customer_segments_*.csv"))
    assert "champion" in printed["models"] and "champion by" in printed["backtest"]
    assert list((demo_dir / "warehouse").parent.rglob("*.html"))


def test_a_past_as_of_date_on_a_fresh_warehouse_keeps_the_later_orders(spark, tmp_path, capsys):
    """`cvseg run --as-of 1997-09-30` over the whole CDNOW file (to 1998-06-30): nothing is
    quarantined as future (the file is read today), features stop at the as-of date."""
    from pyspark.sql import functions as F

    from core.storage import Storage
    from jobs.demo import cdnow_sample_path, example_conf

    warehouse = tmp_path / "warehouse"
    argv = ["run", "--conf", str(example_conf("cdnow")), "--as-of", "1997-09-30", "--steps", "ingest,features",
            "--set", f"storage.warehouse={warehouse}", "--set", f"source.path={cdnow_sample_path()}",
            "--set", "spark.master=null", "--set", "storage.backend=deltalake"]
    assert main(argv) == 0
    assert "6,919 rows read, 6,919 orders new or changed, 0 quarantined" in capsys.readouterr().out
    storage = Storage(spark, str(warehouse), backend="deltalake")
    orders = storage.read("orders").agg(F.count(F.lit(1)), F.max("order_date")).first()
    assert (orders[0], str(orders[1])) == (6919, "1998-06-30")
    features = storage.read("customer_features").agg(F.count(F.lit(1)), F.max("as_of_date"), F.max("n_orders"))
    customers, as_of, _ = features.first()
    assert (customers, str(as_of)) == (2357, "1997-09-30")


def test_a_folder_another_demo_wrote_is_refused_before_anything_is_written(tmp_path, capsys):
    """`cvseg demo` then `cvseg demo --dataset cdnow` in the same folder: CDNOW's 1998 night cannot go
    on the synthetic demo's 2026 warehouse; the second demo says where to run instead, and writes nothing."""
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    (demo_dir / ".cvseg-demo-dataset").write_text("synthetic\n", encoding="utf-8")
    assert main(["demo", "--dataset", "cdnow", "--dir", str(demo_dir)]) == 2
    err = capsys.readouterr().err
    assert "holds the synthetic demo's warehouse" in err and f"--dir {demo_dir}-cdnow" in err, err
    assert sorted(p.name for p in demo_dir.iterdir()) == [".cvseg-demo-dataset"]
    assert (demo_dir / ".cvseg-demo-dataset").read_text(encoding="utf-8") == "synthetic\n"
