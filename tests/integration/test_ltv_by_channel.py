"""ltv_by_channel, segment totals' intervals and the report's "LTV by acquisition media" page on a
small generated warehouse.

1,200 generated customers (orders straight into the ``orders`` schema, as test_value_intervals.py),
each acquired through one of three channels or none; features, a BG/NBD fit and scores, then the
nightly run's segments and trends steps (trends writes ``ltv_by_channel``) and the diagnostic report. Expected
figures come from the orders and ``customer_scores`` in pandas, not from the code under test.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from core.config import load_config
from core.tables import CUSTOMER_FEATURES, CUSTOMER_SCORES, LTV_BY_CHANNEL, ORDERS
from pipelines.features import run_features
from datagen.generate import GeneratorParams
from pipelines.ltv import fit_btyd_bundles, run_score

from .test_purchase_basis import CONF, END, orders_frame

N_CUSTOMERS = 1200
CHANNELS = ("web", "app", "catalogue_dm", None)


@pytest.fixture(scope="module")
def engine(spark, tmp_path_factory):
    from core.storage import Storage
    from pipelines.segments import run_segments
    from pipelines.value_totals import run_ltv_by_channel

    root = tmp_path_factory.mktemp("ltv_by_channel")
    config = load_config(CONF, [f"storage.warehouse={root / 'warehouse'}", "models.purchase_models=[bgnbd]"])
    orders = orders_frame(N_CUSTOMERS, 2031, GeneratorParams())
    number = orders["customer_id"].str[1:].astype(int)
    orders["channel"] = [CHANNELS[k % len(CHANNELS)] for k in number]   # one channel per customer
    storage = Storage(spark, config.storage.warehouse, backend="deltalake")
    storage.overwrite(ORDERS.name, spark.createDataFrame(orders, ORDERS.schema))
    run_features(storage, END, config.features)
    features_df = storage.read(CUSTOMER_FEATURES.name).where(F.col("as_of_date") == F.lit(END))
    bundle = fit_btyd_bundles(features_df, ("bgnbd",), config.features.time_unit).bundles["bgnbd"]
    run_score(storage, END, bundle, "7")
    run_segments(storage, END, config.segments)
    # what the trends step runs after run_trends (its wiring: test_nightly_run)
    summary = run_ltv_by_channel(storage, END)
    return {"storage": storage, "orders": orders, "summary": summary}


def _rows(storage) -> pd.DataFrame:
    return (storage.read(LTV_BY_CHANNEL.name).where(F.col("as_of_date") == F.lit(END)).toPandas()
            .sort_values(["acquisition_channel", "acquisition_month"]).reset_index(drop=True))


def test_ltv_by_channel_adds_up_to_the_scores(engine):
    storage, orders = engine["storage"], engine["orders"]
    rows = _rows(storage)
    assert engine["summary"].asdict() == {"ltv_by_channel_rows": len(rows), "ltv_by_channel_customers": N_CUSTOMERS,
                                          "ltv_by_channel_rows_with_interval": len(rows)}
    scores = storage.read(CUSTOMER_SCORES.name).where(F.col("as_of_date") == F.lit(END)).toPandas()
    # every scored customer once: by the channel and month of the first order in the orders
    first = orders.sort_values(["order_ts", "order_id"]).groupby("customer_id").first()
    first = first.assign(acquisition_channel=first["channel"].fillna("(unknown)"),
                         acquisition_month=pd.to_datetime(first["order_date"]).dt.strftime("%Y-%m"))
    expected = (scores.drop(columns="acquisition_channel")      # the carried copy: checked below
                .join(first[["acquisition_channel", "acquisition_month"]], on="customer_id")
                .groupby(["acquisition_channel", "acquisition_month"])
                .agg(customers=("customer_id", "size"), total=("predicted_net_value", "sum")).reset_index()
                .sort_values(["acquisition_channel", "acquisition_month"]).reset_index(drop=True))
    assert rows["customers"].sum() == len(scores) == N_CUSTOMERS
    assert set(rows["acquisition_channel"]) == {"web", "app", "catalogue_dm", "(unknown)"}
    pd.testing.assert_frame_equal(rows[["acquisition_channel", "acquisition_month", "customers"]],
                                  expected[["acquisition_channel", "acquisition_month", "customers"]],
                                  check_dtype=False)
    np.testing.assert_allclose(rows["predicted_net_value"], expected["total"], rtol=1e-9)
    np.testing.assert_allclose(rows["predicted_net_value_mean"], expected["total"] / expected["customers"], rtol=1e-9)
    # every customer has an interval (BG/NBD, gross basis): every row has one, around its total...
    assert (rows["customers_without_interval"] == 0).all() and rows["predicted_net_value_p10"].notna().all()
    assert (rows["predicted_net_value_p10"] <= rows["predicted_net_value"]).all()
    # ...except a group of a few rare buyers that brings nothing with probability >= 90%: P90 is 0
    # there, below the mean (the value's rare large outcomes); only a handful of rows of ~5 customers
    nothing = np.exp(rows["predicted_net_value_log_p_zero"]) >= 0.9
    assert nothing.sum() <= 0.05 * len(rows) and (rows.loc[nothing, "predicted_net_value_p90"] == 0).all()
    assert (rows.loc[~nothing, "predicted_net_value"] <= rows.loc[~nothing, "predicted_net_value_p90"]).all()
    assert (rows["model_version"] == "7").all() and (rows["horizon_months"] == 6).all()



def test_a_channels_months_roll_up_to_one_interval(engine):
    from report.sources import channel_value

    storage, orders = engine["storage"], engine["orders"]
    scores = storage.read(CUSTOMER_SCORES.name).where(F.col("as_of_date") == F.lit(END)).toPandas()
    channel = orders.groupby("customer_id")["channel"].first().fillna("(unknown)")
    web = scores[scores["customer_id"].map(channel) == "web"]
    rolled = channel_value(storage, END).set_index("acquisition_channel").loc["web"]
    assert rolled["customers"] == len(web)
    assert rolled["value"] == pytest.approx(web["predicted_net_value"].sum(), rel=1e-9)
    assert rolled["value_p10"] < rolled["value"] < rolled["value_p90"]
    # ~300 customers: far narrower than their own intervals added up
    assert rolled["value_p90"] - rolled["value_p10"] < 0.2 * (web["predicted_net_value_p90"]
                                                              - web["predicted_net_value_p10"]).sum()


def test_f2_is_a_second_purchase_day_within_90_days(engine):
    storage, orders = engine["storage"], engine["orders"]
    rows = _rows(storage).set_index(["acquisition_channel", "acquisition_month"])
    # from the orders: purchase days (cancelled orders count, the BTYD convention), second within 90 days
    days = orders.assign(day=pd.to_datetime(orders["order_date"])).groupby("customer_id")["day"]
    first, second = days.min(), days.apply(lambda d: d.drop_duplicates().nsmallest(2).max())
    channel = orders.groupby("customer_id")["channel"].first().fillna("(unknown)")
    converted = ((second > first) & ((second - first).dt.days <= 90)).groupby(
        [channel, first.dt.strftime("%Y-%m")]).sum()
    converted.index.names = rows.index.names
    pd.testing.assert_series_equal(rows["converted_90d"], converted.loc[rows.index], check_dtype=False,
                                   check_names=False)
    np.testing.assert_allclose(rows["f2_rate_90d"], rows["converted_90d"] / rows["customers"])
    assert rows["is_complete_90d"].any() and not rows["is_complete_90d"].all()   # the last three months are not


def test_a_rerun_writes_the_same_rows(engine):
    from pipelines.value_totals import run_ltv_by_channel

    storage = engine["storage"]
    before = _rows(storage)
    run_ltv_by_channel(storage, END)
    pd.testing.assert_frame_equal(_rows(storage), before)


def test_segment_totals_have_their_interval(engine):
    from report.data import customer_base
    from report.sources import segments_value

    storage = engine["storage"]
    segments = segments_value(storage, customer_base(storage, END), END).set_index("group")
    scores = storage.read(CUSTOMER_SCORES.name).where(F.col("as_of_date") == F.lit(END)).toPandas()
    placed = storage.read("segments_current").toPandas().merge(scores, on="customer_id")
    per_segment = placed.groupby("segment")["predicted_net_value"].sum()
    np.testing.assert_allclose(segments.loc[per_segment.index, "value"], per_segment, rtol=1e-9)
    assert segments["value_p10"].notna().all()
    big = segments[segments["customers"] >= 100]
    assert len(big) >= 2 and (big["value_p10"] < big["value"]).all() and (big["value"] < big["value_p90"]).all()
    # the interval of a total, not the customers' added up: far narrower (value bands; a dormant
    # customer's own interval is mostly [0, 0], the rare buyers among them widen only the total's)
    own = placed.assign(width=placed["predicted_net_value_p90"] - placed["predicted_net_value_p10"]) \
        .groupby("segment")["width"].sum()
    bands = big.drop(index=["new", "dormant"], errors="ignore")
    assert len(bands) >= 2 and ((bands["value_p90"] - bands["value_p10"]) < 0.3 * own[bands.index]).all()


def test_the_report_shows_ltv_by_acquisition_media(engine):
    from report import build, collect
    from report.html import render_html
    from report.i18n import Formats, Messages

    storage = engine["storage"]
    data = collect(storage, END, weekly=False)
    rows = _rows(storage)
    web = rows[rows["acquisition_channel"] == "web"]
    for language in ("en", "ja"):
        html = render_html(build(data, language, "JPY", "test-client"))
        m, f = Messages(language), Formats(language, "JPY")
        assert m("sec.channel_value") in html and f'alt="{m("cv.chart.title")}"' in html
        assert f.money(web["predicted_net_value"].sum()) in html
        assert f.money(web["predicted_net_value"].sum() / web["customers"].sum()) in html
        complete = web[web["is_complete_90d"]]
        assert f.pct(complete["converted_90d"].sum() / complete["customers"].sum()) in html


def test_scores_carry_the_acquisition_and_an_older_partition_reads_it_from_the_features(engine):
    """customer_scores holds each customer's acquisition columns as customer_features had them at D, so
    ltv_by_channel reads the scores alone; a partition scored before it carried them (the columns null)
    gives the same rows through the features."""
    from core.tables import SCORES_CARRIED_COLUMNS
    from pipelines.value_totals import run_ltv_by_channel

    storage = engine["storage"]
    at_end = F.col("as_of_date") == F.lit(END)
    scores = storage.read(CUSTOMER_SCORES.name).where(at_end).toPandas().set_index("customer_id").sort_index()
    features = storage.read(CUSTOMER_FEATURES.name).where(at_end).toPandas().set_index("customer_id").sort_index()
    carried = list(SCORES_CARRIED_COLUMNS)
    assert scores["first_order_date"].notna().all() and scores["days_to_second_purchase"].notna().any()
    pd.testing.assert_frame_equal(scores[carried], features.loc[scores.index, carried], check_dtype=False)
    before = _rows(storage)
    older = storage.read(CUSTOMER_SCORES.name).where(at_end).select(
        *[F.lit(None).cast(CUSTOMER_SCORES.schema[c].dataType).alias(c) if c in carried else F.col(c)
          for c in CUSTOMER_SCORES.schema.fieldNames()])
    spark = older.sparkSession
    storage.replace_partitions(CUSTOMER_SCORES.name, spark.createDataFrame(older.toPandas(), CUSTOMER_SCORES.schema),
                               partitions={"as_of_date": [END]})
    try:
        assert storage.read(CUSTOMER_SCORES.name).where(at_end & F.col("first_order_date").isNotNull()).count() == 0
        run_ltv_by_channel(storage, END)
        pd.testing.assert_frame_equal(_rows(storage), before)
    finally:
        storage.replace_partitions(CUSTOMER_SCORES.name, spark.createDataFrame(scores.reset_index()[
            CUSTOMER_SCORES.schema.fieldNames()], CUSTOMER_SCORES.schema), partitions={"as_of_date": [END]})
