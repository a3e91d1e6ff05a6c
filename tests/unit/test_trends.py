"""Trend tables vs an independent pandas computation; incremental == rebuild; re-runs write nothing."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from core.config import FeaturesConf, TrendsConf
from core.tables import INGEST_RUNS, ORDERS, SEGMENTS_CURRENT

D1 = dt.date(2025, 12, 24)      # a Wednesday: partial week, and the year ends before D2
D2 = dt.date(2026, 1, 14)
CHANNELS = ("web", "app", "catalogue_dm", None)
CATEGORIES = ("food", "beauty", "apparel", None)
SEGMENTS = ("top", "middle", "low", "new")
TABLE_KEYS = {
    "trend_weekly_segment": ["week_start", "segment"],
    "trend_new_customers_weekly": ["week_start", "acquisition_channel"],
    "trend_f2_conversion": ["cohort_month"],
    "trend_cohort_retention": ["activity_month", "cohort_month"],
    "trend_yearly": ["year"],
    "trend_yearly_category": ["year", "category"],
}


def seeded_orders(seed: int, n_customers: int, start: dt.date, end: dt.date, run_id: str,
                  prefix: str = "c") -> pd.DataFrame:
    """Small seeded order history: customers with 1-8 orders, some cancelled or partly cancelled."""
    rng = np.random.default_rng(seed)
    span = (end - start).days
    rows = []
    for c in range(n_customers):
        first = int(rng.integers(0, span + 1))
        n = int(rng.choice([1, 1, 2, 3, 5, 8]))
        days = sorted([first] + [min(span, first + int(rng.exponential(70))) for _ in range(n - 1)])
        channel = CHANNELS[int(rng.integers(0, len(CHANNELS)))]
        for k, day in enumerate(days):
            gross = float(rng.integers(10, 500) * 10)
            cancelled = bool(rng.random() < 0.12)
            partly = 0.0 if cancelled or rng.random() > 0.1 else float(rng.integers(1, 10) * 10)
            cancelled_amount = gross if cancelled else min(partly, gross)
            rows.append({"order_id": f"{run_id}-{c}-{k}", "customer_id": f"{prefix}{c:03d}",
                         "order_date": start + dt.timedelta(days=day), "hour": k % 24,
                         "gross_amount": gross, "is_cancelled": cancelled, "cancelled_amount": cancelled_amount,
                         "net_amount": gross - cancelled_amount,
                         "channel": channel if k == 0 else CHANNELS[int(rng.integers(0, 3))],
                         "category": CATEGORIES[int(rng.integers(0, len(CATEGORIES)))], "ingest_run_id": run_id})
    return pd.DataFrame(rows)


def write_orders(storage, pdf: pd.DataFrame, runs: str = "dated", how: str = "merge") -> None:
    """Orders as ingest writes them; ``runs``: each ingest run's row in ``ingest_runs`` with the
    first order date it wrote ("dated"), without it (a run recorded before that column existed:
    "undated"), or no ``ingest_runs`` at all ("unrecorded": orders written by other means).
    ``how``: "merge" (a rewrite of the table, as when ingest replaces orders) or "append" (new order
    ids only, what a regular night's ingest does)."""
    text = lambda value: None if pd.isna(value) else value  # noqa: E731 - pandas turns None into NaN
    data = [(r.order_id, r.customer_id, dt.datetime.combine(r.order_date, dt.time(r.hour)), r.order_date,
             r.gross_amount, r.is_cancelled, r.cancelled_amount, r.net_amount, text(r.channel), text(r.category),
             "JPY", None,
             "test.csv", i + 1, r.ingest_run_id, r.order_date.strftime("%Y-%m"))
            for i, r in enumerate(pdf.itertuples())]
    getattr(storage, how)(ORDERS.name, storage.spark.createDataFrame(data, ORDERS.schema))
    if runs == "unrecorded":
        return
    write_ingest_runs(storage, [(run_id, len(group), min(group["order_date"]) if runs == "dated" else None)
                                for run_id, group in pdf.groupby("ingest_run_id")])


def write_ingest_runs(storage, runs: list[tuple[str, int, dt.date | None]]) -> None:
    """``ingest_runs`` rows of successful runs: (run id, orders written, first order date written)."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = [(run_id, now.date(), "test.csv", written, written, 0, 0, written, {}, now, now, "ok", 0, 0,
             None, None, None, "default", first_date) for run_id, written, first_date in runs]
    storage.append(INGEST_RUNS.name, storage.spark.createDataFrame(rows, INGEST_RUNS.schema))


def write_segments(storage, assignments: dict[str, str], as_of: dt.date) -> None:
    rows = [(cid, seg, 1, as_of, 1.0, 0.5, as_of) for cid, seg in sorted(assignments.items())]
    storage.append(SEGMENTS_CURRENT.name, storage.spark.createDataFrame(rows, SEGMENTS_CURRENT.schema))


def build_features(storage, as_of: dt.date) -> None:
    """customer_features through the real stage (what the nightly run does)."""
    from pipelines.features import run_features

    run_features(storage, as_of, FeaturesConf())


def write_trend_features(storage, orders: pd.DataFrame, as_of: dt.date) -> None:
    """Only the customer_features columns trends read, from pandas (faster than the stage)."""
    from core.tables import CUSTOMER_FEATURES

    o = orders[orders["order_date"] <= as_of].sort_values(["customer_id", "order_date", "hour", "order_id"])
    rows = []
    for cid, group in o.groupby("customer_id"):
        days = sorted(set(group["order_date"]))
        channel = group["channel"].iloc[0]
        rows.append({"as_of_date": as_of, "customer_id": cid, "first_order_date": days[0], "last_order_date": days[-1],
                     "acquisition_channel": None if pd.isna(channel) else channel,
                     "days_to_second_purchase": (days[1] - days[0]).days if len(days) > 1 else None})
    filler = {"string": "x", "bigint": 0, "int": 0, "double": 0.0, "boolean": False, "date": as_of}
    data = [tuple(row[f.name] if f.name in row
                  else filler[f.dataType.simpleString()] for f in CUSTOMER_FEATURES.schema.fields) for row in rows]
    storage.replace_partitions(CUSTOMER_FEATURES.name, storage.spark.createDataFrame(data, CUSTOMER_FEATURES.schema),
                               partitions={"as_of_date": [as_of]})


def read_table(storage, name: str) -> pd.DataFrame:
    pdf = storage.read(name).toPandas()
    return pdf.sort_values(TABLE_KEYS[name]).reset_index(drop=True)


def assert_frames_equal(got: pd.DataFrame, want: pd.DataFrame, name: str) -> None:
    got = got.sort_values(TABLE_KEYS[name]).reset_index(drop=True)
    want = want[list(got.columns)].sort_values(TABLE_KEYS[name]).reset_index(drop=True)
    assert len(got) == len(want), f"{name}: {len(got)} rows, expected {len(want)}"
    for column in got.columns:
        if pd.api.types.is_float_dtype(want[column]) or pd.api.types.is_float_dtype(got[column]):
            np.testing.assert_allclose(got[column].astype(float), want[column].astype(float), rtol=1e-9,
                                       err_msg=f"{name}.{column}")
        else:
            assert got[column].tolist() == want[column].tolist(), f"{name}.{column}"


# --------------------------------------------------------------------------------------------
# The independent computation (pandas, straight from the orders)
# --------------------------------------------------------------------------------------------
def _monday(day: dt.date) -> dt.date:
    return day - dt.timedelta(days=day.weekday())


def expected_tables(orders: pd.DataFrame, segments: dict[str, str], as_of: dt.date, years: int = 5) -> dict:
    o = orders[orders["order_date"] <= as_of].copy()
    o["category"] = o["category"].fillna("(unknown)")
    o = o.sort_values(["customer_id", "order_date", "hour", "order_id"])
    first = o.groupby("customer_id").head(1).set_index("customer_id")   # (first() would skip nulls)
    cust = pd.DataFrame({"first": first["order_date"], "channel": first["channel"].fillna("(unknown)")})
    cust["segment"] = [segments.get(c, "(unsegmented)") for c in cust.index]
    days = o.groupby("customer_id")["order_date"].apply(lambda s: sorted(set(s)))
    cust["to_second"] = [(d[1] - d[0]).days if len(d) > 1 else None for d in days.reindex(cust.index)]
    cust["week"] = cust["first"].map(_monday)
    cust["cohort"] = cust["first"].map(lambda d: d.strftime("%Y-%m"))
    o = o.join(cust[["first", "segment", "cohort"]], on="customer_id")
    o["week"] = o["order_date"].map(_monday)
    o["month"] = o["order_date"].map(lambda d: d.strftime("%Y-%m"))
    o["year"] = o["order_date"].map(lambda d: d.year)
    o["first_year"] = o["first"].map(lambda d: d.year)
    active = o[~o["is_cancelled"]]
    out = {}

    rows = []
    for seg, group in cust.groupby("segment"):
        week = group["week"].min()
        while week <= _monday(as_of):
            in_week = o[(o["segment"] == seg) & (o["week"] == week)]
            buyers = active[(active["segment"] == seg) & (active["week"] == week)]["customer_id"].nunique()
            rows.append({"year": week.year, "week_start": week, "week_end": week + dt.timedelta(days=6), "segment": seg,
                         "customers": int((group["first"] <= week + dt.timedelta(days=6)).sum()),
                         "active_buyers": buyers, "orders": len(in_week),
                         "cancelled_orders": int(in_week["is_cancelled"].sum()),
                         "gross": float(in_week["gross_amount"].sum()),
                         "cancelled": float(in_week["cancelled_amount"].sum()),
                         "net": float(in_week["net_amount"].sum()),
                         "is_partial_week": week + dt.timedelta(days=6) > as_of})
            week += dt.timedelta(days=7)
    out["trend_weekly_segment"] = pd.DataFrame(rows)

    new = cust.groupby(["week", "channel"]).size().rename("new_customers").reset_index()
    out["trend_new_customers_weekly"] = pd.DataFrame({
        "year": [w.year for w in new["week"]], "week_start": new["week"], "acquisition_channel": new["channel"], "new_customers": new["new_customers"],
        "is_partial_week": [w + dt.timedelta(days=6) > as_of for w in new["week"]]})

    rows = []
    for cohort, group in cust.groupby("cohort"):
        start = dt.date.fromisoformat(cohort + "-01")
        last = (pd.Timestamp(start) + pd.offsets.MonthEnd(0)).date()
        row = {"cohort_year": start.year, "cohort_month": cohort, "customers": len(group)}
        for w in (90, 180):
            row[f"converted_{w}d"] = int((group["to_second"].dropna() <= w).sum())
            row[f"f2_rate_{w}d"] = row[f"converted_{w}d"] / len(group)
            row[f"is_complete_{w}d"] = last + dt.timedelta(days=w) <= as_of
        rows.append(row)
    out["trend_f2_conversion"] = pd.DataFrame(rows)

    sizes = cust.groupby("cohort").size()
    rows = []
    for (month, cohort), group in o.groupby(["month", "cohort"]):
        months = (int(month[:4]) - int(cohort[:4])) * 12 + int(month[5:]) - int(cohort[5:])
        act = group[~group["is_cancelled"]]["customer_id"].nunique()
        rows.append({"activity_year": int(month[:4]), "activity_month": month, "cohort_month": cohort, "months_since_first_order": months,
                     "cohort_customers": int(sizes[cohort]), "active_customers": act, "orders": len(group),
                     "net": float(group["net_amount"].sum()), "retention_rate": act / sizes[cohort]})
    out["trend_cohort_retention"] = pd.DataFrame(rows)

    window = range(as_of.year - years + 1, as_of.year + 1)
    rows, cat_rows = [], []
    for year in window:
        in_year = o[o["year"] == year]
        if in_year.empty and not (cust["first"].map(lambda d: d.year) == year).any():
            continue
        is_new = in_year["first_year"] == year
        act = in_year[~in_year["is_cancelled"]]
        rows.append({"year": year, "new_customers": int((cust["first"].map(lambda d: d.year) == year).sum()),
                     "existing_customers": act[act["first_year"] < year]["customer_id"].nunique(),
                     "new_customer_net": float(in_year[is_new]["net_amount"].sum()),
                     "existing_customer_net": float(in_year[~is_new]["net_amount"].sum()),
                     "net": float(in_year["net_amount"].sum()), "orders": len(in_year),
                     "is_partial_year": dt.date(year, 12, 31) > as_of,
                     "through_date": min(dt.date(year, 12, 31), as_of)})
        for category, group in in_year.groupby("category"):
            g_new = group["first_year"] == year
            g_act = group[~group["is_cancelled"]]
            cat_rows.append({"year": year, "category": category,
                             "new_customers": g_act[g_act["first_year"] == year]["customer_id"].nunique(),
                             "existing_customers": g_act[g_act["first_year"] < year]["customer_id"].nunique(),
                             "new_customer_net": float(group[g_new]["net_amount"].sum()),
                             "existing_customer_net": float(group[~g_new]["net_amount"].sum()),
                             "net": float(group["net_amount"].sum()), "orders": len(group),
                             "is_partial_year": dt.date(year, 12, 31) > as_of})
    out["trend_yearly"] = pd.DataFrame(rows)
    out["trend_yearly_category"] = pd.DataFrame(cat_rows)
    return out


def segment_map(customer_ids, share: float = 0.8, seed: int = 3) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {c: SEGMENTS[int(rng.integers(0, len(SEGMENTS)))] for c in sorted(customer_ids) if rng.random() < share}


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("second_write", ["append", "merge"])
def test_trends_match_pandas_and_incremental_equals_rebuild(storage, second_write):
    """Two nights (the second with late files, a backfill and newly placed customers): the
    incremental state vs the independent pandas computation and vs a rebuild; years the
    incremental run did not recompute come from the first night, so they are checked too.
    The second night's orders appended (a regular ingest: the stored activity cells are updated from
    the touched customers) or merged (the table rewritten: the cells come from every order again)."""
    from pipelines.trends import run_trends

    conf = TrendsConf(recompute_weeks=1, years=2)
    batch1 = seeded_orders(11, 60, dt.date(2023, 10, 1), D1 + dt.timedelta(days=5), "run-1")  # some after D1
    write_orders(storage, batch1)
    build_features(storage, D1)       # the real stage once, so its column semantics are checked too
    segments = segment_map(batch1["customer_id"].unique(), share=0.7)
    write_segments(storage, segments, D1)
    assert run_trends(storage, D1, conf).mode == "rebuild"    # the first run builds everything

    # next ingest: recent orders, newcomers, and a backfill of old orders the first file missed
    batch2 = seeded_orders(12, 15, D1 - dt.timedelta(days=20), D2, "run-2", prefix="n")
    backfill = seeded_orders(13, 4, dt.date(2024, 2, 1), dt.date(2024, 9, 30), "run-2", prefix="c")
    backfill["order_id"] = "late-" + backfill["order_id"]
    write_orders(storage, pd.concat([batch2, backfill]), how=second_write)
    write_trend_features(storage, pd.concat([batch1, batch2, backfill]), D2)
    placed = {c: "new" for c in sorted(batch2["customer_id"].unique())[:10]}
    placed.update({c: "low" for c in sorted(set(batch1["customer_id"]) - set(segments))[:3]})
    write_segments(storage, placed, D2)

    summary = run_trends(storage, D2, conf)
    assert summary.mode == "incremental"
    # orders were only appended since the first run: the stored activity cells were updated from the
    # customers with new orders, orders dated after D1 (stored before, not counted at D1) or placed since
    after_d1 = batch1[(batch1["order_date"] > D1) & (batch1["order_date"] <= D2)]
    touched = set(batch2["customer_id"]) | set(backfill["customer_id"]) | set(after_d1["customer_id"]) | set(placed)
    assert summary.cells_updated_from == (len(touched) if second_write == "append" else None)
    assert summary.recomputed_from["trend_new_customers_weekly"] == 2024   # the backfill's year
    assert summary.recomputed_from["trend_yearly"] == 2025     # 2024 left the window
    assert summary.recomputed_from["trend_f2_conversion"] == 2023
    incremental = {name: read_table(storage, name) for name in TABLE_KEYS}
    all_orders = pd.concat([batch1, batch2, backfill])
    want = expected_tables(all_orders, {**segments, **placed}, D2, years=2)
    assert set(incremental["trend_yearly"]["year"]) == {2025, 2026}   # 2024 left the window at the year change
    for name in TABLE_KEYS:
        assert_frames_equal(incremental[name], want[name], name)

    versions = {name: storage.version(name) for name in [*TABLE_KEYS, "trend_runs"]}
    assert run_trends(storage, D2, conf).mode == "unchanged"
    assert {name: storage.version(name) for name in versions} == versions

    assert run_trends(storage, D2, conf, rebuild=True).mode == "rebuild"
    for name in TABLE_KEYS:
        assert_frames_equal(read_table(storage, name), incremental[name], name)


def test_ingest_runs_first_dates_come_from_ingest_runs_and_orders_only_where_unrecorded(storage):
    """Where an incremental run finds each ingest run's first order date: ``ingest_runs`` when the
    run recorded it; ``orders`` for runs recorded before that column existed that the last run had
    not seen, and for every run when nothing recorded them (orders written by other means)."""
    from pyspark.sql import functions as F

    from pipelines.trends import _ingest_run_first_dates

    d = dt.date(2025, 6, 30)
    orders = pd.concat([seeded_orders(21, 5, dt.date(2024, 1, 1), dt.date(2024, 12, 31), "old"),
                        seeded_orders(22, 5, dt.date(2025, 3, 1), dt.date(2025, 6, 30), "legacy", prefix="l"),
                        seeded_orders(23, 5, dt.date(2025, 6, 1), dt.date(2025, 6, 30), "new", prefix="n")])
    first = orders.groupby("ingest_run_id")["order_date"].min().to_dict()
    write_orders(storage, orders, runs="unrecorded")
    orders_df = storage.read(ORDERS.name).where(F.col("order_date") <= F.lit(d))
    assert _ingest_run_first_dates(storage, orders_df, {"old"}, need_dates=True) == first

    # "old" and "legacy" recorded before the column existed, "new" with it; "old" already seen
    write_ingest_runs(storage, [("old", 5, None), ("legacy", 5, None), ("new", 5, first["new"]),
                                ("nothing-new", 0, None)])   # re-read files: no order written
    orders_df = orders_df.where(F.col("ingest_run_id") != "new")   # not looked up: proven by its absence here
    got = _ingest_run_first_dates(storage, orders_df, {"old"}, need_dates=True)
    assert got == {"old": None, "legacy": first["legacy"], "new": first["new"]}
    # a rebuild needs only the runs, not their dates
    assert _ingest_run_first_dates(storage, orders_df.limit(0), set(), need_dates=False) == {
        "old": None, "legacy": None, "new": first["new"]}


def test_missing_features_say_what_to_run(storage):
    from pipelines.trends import TrendsError, run_trends

    write_orders(storage, seeded_orders(1, 3, dt.date(2025, 1, 1), D1, "run-1"))
    with pytest.raises(TrendsError, match="cvseg features --as-of 2025-12-24"):
        run_trends(storage, D1, TrendsConf())
