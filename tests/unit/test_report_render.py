"""Report rendering from hand-made aggregates shaped like the engine's tables (no Spark).

Covers the sections whose tables need several pipeline runs (two segment generations, a
backtest), every string in both languages, and the number formats.
"""
from __future__ import annotations

import datetime as dt
import html
import re

import numpy as np
import pandas as pd
import pytest

from report import build
from report.data import DiagnosticData, Histogram, WeeklyData, week_windows
from report.tables import Missing
from report.html import render_html
from report.i18n import CATALOGUE, LANGUAGES, Formats, Messages
from report.pdf import render_pdf

AS_OF = dt.date(2026, 9, 30)
GENERATED = dt.datetime(2026, 10, 1, 6, 0)


def _hist(cap: float, counts) -> Histogram:
    counts = np.asarray(counts, dtype=np.int64)
    return Histogram(edges=np.linspace(0, cap, len(counts) + 1), counts=counts, median=cap / 4, mean=cap / 3,
                     cap=cap, total=int(counts.sum()))


@pytest.fixture(scope="module")
def full_data() -> DiagnosticData:
    segments = pd.DataFrame({"group": ["top", "high", "middle", "low", "dormant"],
                             "customers": [100, 200, 300, 300, 100],
                             "value": [5_000_000.0, 3_000_000.0, 1_500_000.0, 400_000.0, 100_000.0]})
    segments["mean_value"] = segments["value"] / segments["customers"]
    deciles = pd.DataFrame({"group": range(1, 11), "customers": [100] * 10,
                            "value": [4e6, 2e6, 1.2e6, 8e5, 6e5, 4e5, 3e5, 2e5, 1e5, 5e4]})
    months = pd.date_range("2024-07-01", periods=24, freq="MS").date
    f2 = pd.DataFrame({"cohort_month": months, "customers": [50] * 24,
                       "converted": [20] * 18 + [15] * 6})
    f2["f2_rate"] = f2["converted"] / f2["customers"]
    migration = pd.DataFrame({"from_generation": 1, "to_generation": 2,
                              "from_segment": ["top", "top", "high", "high", "middle", "(none)", "low"],
                              "to_segment": ["top", "high", "high", "dormant", "middle", "new", "(gone)"],
                              "customers": [80, 20, 150, 50, 300, 90, 10]})
    review = pd.DataFrame({"generation_id": 1, "segment": ["top", "high", "middle"],
                           "valid_from": dt.date(2026, 3, 31), "valid_to": AS_OF, "customers": [100, 200, 300],
                           "predicted_net_value": [5e6, 3e6, 1.5e6], "actual_net_value": [4.6e6, 3.2e6, 1.1e6],
                           "actual_to_predicted": [0.92, 1.07, 0.73], "horizon_coverage": [1.0, 1.0, 0.9]})
    backtest = pd.DataFrame({"model": ["bgnbd", "cohort", "naive"], "value_model": ["btyd", "cohort", "naive"],
                             "mae": [5280.0, 7613.0, 5886.0], "rmse": [11781.0, 17130.0, 14368.0],
                             "abs_total_error_pct": [3.9, 5.6, 17.2], "spearman": [0.61, 0.50, 0.61],
                             "normalized_gini": [0.81, 0.64, 0.75], "top_decile_capture": [0.54, 0.35, 0.51],
                             "top20_capture": [0.72, 0.50, 0.70], "is_champion": [True, False, False],
                             "champion_metric": "mae"})
    bt_deciles = pd.DataFrame([{"model": m, "decile": d, "n": 100, "mean_predicted": 50_000 / d * k,
                                "mean_actual": 48_000 / d} for m, k in (("bgnbd", 1.0), ("cohort", 1.2),
                                                                        ("naive", 0.8)) for d in range(1, 11)])
    yearly = pd.DataFrame({"year": range(2022, 2027), "new_customers": [400, 420, 410, 400, 300],
                           "existing_customers": [50, 280, 460, 600, 650],
                           "new_customer_net": [6e6, 9e6, 8e6, 7e6, 4e6],
                           "existing_customer_net": [2e6, 7e6, 13e6, 18e6, 16e6],
                           "is_partial_year": [False] * 4 + [True]})
    yearly_category = pd.DataFrame([{"year": y, "category": cat, "net": 1e6 * (i + 1) * (y - 2021),
                                     "new_customers": 10, "existing_customers": 20}
                                    for y in range(2022, 2027) for i, cat in enumerate(["apparel", "home", "化粧品"])])
    weeks = [AS_OF - dt.timedelta(days=7 * i + 2) for i in range(26)][::-1]
    weekly_segment = pd.DataFrame([{"week_start": w, "segment": s, "net": 1e5 * (j + 1), "customers": 100,
                                    "active_buyers": 10, "orders": 12, "is_partial_week": False}
                                   for w in weeks for j, s in enumerate(["top", "high", "middle"])])
    retention = pd.DataFrame([{"cohort_month": f"2025-{m:02d}", "months_since_first_order": k,
                               "cohort_customers": 50, "retention_rate": 0.3 / (k + 1)}
                              for m in range(1, 10) for k in range(0, 10 - m)])
    return DiagnosticData(
        as_of=AS_OF,
        kpis={"customers": 1000, "active_12m": 600, "new_12m": 300, "repeat_customers": 700, "repeat_rate": 0.7,
              "gross_total": 1.0e8, "cancelled_total": 5.0e6, "net_total": 9.5e7, "net_12m": 2.5e7,
              "orders_total": 12345, "first_order_date": dt.date(2021, 10, 1), "last_order_date": AS_OF,
              "scored": 1000, "predicted_net_6m": 1.0e7, "mean_p_alive": 0.6, "median_days_to_second": 58},
        f2_cohorts=f2, cohort_retention=retention,
        gap_hist=_hist(1000, range(30, 0, -1)), aov_hist=_hist(25_000, range(30)), cancel_hist=_hist(1.0, [900] + [5] * 19),
        zero_cancel_share=0.73,
        cancel_bands=pd.DataFrame({"band": [0, 1, 2, 3], "customers": [700, 200, 80, 20],
                                   "mean_gross": [12000.0, 13000.0, 9000.0, 6000.0],
                                   "mean_net": [11800.0, 11500.0, 6500.0, 2500.0]}),
        value_hist=_hist(50_000, range(30, 0, -1)), pareto=segments, pareto_kind="segment", deciles=deciles,
        value_by_segment=segments,
        new_by_channel=pd.DataFrame({"group": ["web", "LINE", "__unknown__"], "customers": [150, 40, 30],
                                     "mean_value": [10220.0, 9000.0, 5000.0]}),
        new_by_category=pd.DataFrame({"group": ["apparel", "化粧品"], "customers": [120, 60],
                                      "mean_value": [11000.0, 8000.0]}),
        yearly=yearly, yearly_category=yearly_category, weekly_segment=weekly_segment,
        champion=pd.DataFrame({"value_model": ["btyd"], "model_version": ["3"], "customers": [1000]}),
        backtest=backtest, backtest_deciles=bt_deciles, migration=migration, generation_review=review,
        quarantine={"runs": {"runs": 1, "input_rows": 13852, "accepted_rows": 13836, "quarantined_rows": 16,
                             "exact_duplicate_rows": 2},
                    "reasons": pd.DataFrame({"reason": ["duplicate_order_conflict", "future_timestamp"],
                                             "rows": [6, 2]})},
    )


def test_ranking_metrics_are_the_higher_is_better_champion_metrics():
    from models.metrics import METRIC_DIRECTION
    from report.diagnostic import RANKING_METRICS

    assert set(RANKING_METRICS) == {m for m, higher_is_better in METRIC_DIRECTION.items() if higher_is_better}


def test_every_message_exists_in_both_languages():
    incomplete = [key for key, texts in CATALOGUE.items() if set(texts) != set(LANGUAGES)]
    assert not incomplete
    with pytest.raises(KeyError, match="no-such-key"):
        Messages("ja")("no-such-key")
    with pytest.raises(ValueError, match="report.language"):
        Messages("fr")


def test_number_formats():
    ja, en = Formats("ja", "JPY"), Formats("en", "JPY")
    assert ja.money(1234567.4) == "1,234,567円" and en.money(1234567.4) == "¥1,234,567"
    assert ja.money(-500) == "-500円" and Formats("en", "USD").money(12.5) == "$12"
    assert ja.count(1200) == "1,200人" and en.count(1200) == "1,200"
    assert ja.money_axis(25_000) == "2.5万" and ja.money_axis(300_000_000) == "3億" and en.money_axis(25_000) == "25k"
    assert ja.pct(0.4891) == "48.9%" and en.change(110, 100) == "+10.0%" and en.change(1, 0) == "—"
    assert ja.unit == "円" and en.unit == "JPY"
    assert ja.date(AS_OF) == "2026年09月30日" and en.date(AS_OF) == "2026-09-30"


@pytest.mark.parametrize("language", LANGUAGES)
def test_full_diagnostic_renders_every_section_with_data(full_data, language):
    m = Messages(language)
    doc = build(full_data, language, "JPY", "acme", GENERATED)
    html = render_html(doc)
    assert "No data yet" not in html and "データなし" not in html
    # one chart per figure of sections 2-7
    for key in ("ret.f2.title", "ret.heat.title", "ret.gap.title", "pur.aov.title", "pur.cancel.title",
                "pur.band.title", "pur.seg.title", "pro.dist.title", "pro.pareto.title", "pro.channel.title",
                "pro.category.title", "tr.cust.title", "tr.rev.title", "tr.cat.title", "tr.week.title",
                "mod.cal.title", "gen.matrix.title", "gen.review.title"):
        assert f'alt="{m(key)}"' in html, key
    findings = re.findall(r"<li>(.*?)</li>", re.search(r'<ol class="findings">(.*?)</ol>', html, re.S).group(1))
    assert len(findings) == 3
    # largest shift off the diagonal: high -> dormant, 50 of the 200 customers of high (25.0%)
    seg = {"ja": ("優良", "休眠"), "en": ("high", "dormant")}[language]
    assert seg[0] in findings[0] and seg[1] in findings[0] and "25.0%" in findings[0]
    # best channel among those with 20+ customers: web 10,220 vs LINE 9,000 (unknown left out)
    assert "10,220" in findings[1] and "1.1" in findings[1]
    # F2: latest six cohorts 15/50 = 30.0% vs 40.0% before
    assert "30.0%" in findings[2] and "40.0%" in findings[2]
    assert m("mod.why", model="bgnbd", metric=m("mod.m.mae"), value=Formats(language, "JPY").money(5280)) in html
    assert m("mod.why.ranking") not in html                  # chosen by an error, not a ranking
    pdf = render_pdf(doc)
    assert pdf.startswith(b"%PDF") and len(pdf) > 50_000


def test_missing_tables_become_one_line_each(full_data):
    """On a warehouse that has only the stage-1 tables every other section says what to run."""
    from report.tables import missing

    absent = {name: missing(AS_OF, table) for name, table in (
        ("cohort_retention", "trend_cohort_retention"), ("value_by_segment", "segments_current"),
        ("yearly", "trend_yearly"), ("yearly_category", "trend_yearly_category"),
        ("weekly_segment", "trend_weekly_segment"), ("backtest", "model_backtest"),
        ("backtest_deciles", "model_backtest_deciles"), ("migration", "segment_migration"),
        ("generation_review", "generation_review"))}
    scores = missing(AS_OF, "customer_scores")
    no_scores = {name: scores for name in ("cancel_bands", "value_hist", "pareto", "deciles", "new_by_channel",
                                           "new_by_category", "champion")}
    data = DiagnosticData(**{**full_data.__dict__, **absent, **no_scores,
                             "kpis": {**full_data.kpis, "scored": 0}, "f2_cohorts": pd.DataFrame()})
    html = render_html(build(data, "en", "JPY", "acme", GENERATED))
    for table, command in (("segments_current", "cvseg segments --as-of 2026-09-30"),
                           ("trend_yearly", "cvseg trends --as-of 2026-09-30"),
                           ("model_backtest", "cvseg backtest --as-of 2026-09-30")):
        assert f"No data yet: table {table} does not exist. `{command}` produces it." in html
    # migration and review come with the second generation: not "run cvseg segments" (it ran)
    assert "segment_migration, generation_review are written when the second segment generation is cut" in html
    assert "table segment_migration does not exist" not in html
    # the models section says it once (the decile chart needs the same run)
    assert html.count("table model_backtest does not exist") == 1
    assert html.count("table customer_scores does not exist") == 6
    assert "Predicted net revenue, next 6 months" not in html    # no score-based figure without scores


def test_weekly_report_compares_three_weeks():
    windows = week_windows(AS_OF)
    assert windows["this"] == (dt.date(2026, 9, 21), dt.date(2026, 9, 27))
    assert windows["last"] == (dt.date(2026, 9, 14), dt.date(2026, 9, 20))
    assert windows["year"] == (dt.date(2025, 9, 22), dt.date(2025, 9, 28))
    assert week_windows(dt.date(2026, 9, 27))["this"] == (dt.date(2026, 9, 21), dt.date(2026, 9, 27))
    data = WeeklyData(
        as_of=AS_OF, windows=windows,
        orders=pd.DataFrame({"week": ["this", "last", "year"], "orders": [110, 100, 80], "buyers": [90, 85, 70],
                             "gross": [700_000.0, 650_000.0, 500_000.0], "net": [660_000.0, 600_000.0, 480_000.0]}),
        new_f2=pd.DataFrame({"week": ["this", "this", "last", "year"], "channel": ["web", "LINE", "web", "web"],
                             "new_customers": [12, 3, 8, 10], "f2_conversions": [4, 1, 2, 3]}),
        segments=pd.DataFrame({"week": ["this", "last", "year"], "segment": "top", "customers": 100,
                               "active_buyers": [20, 18, 15], "orders": [25, 22, 18], "net": [300_000.0, 250_000.0, 200_000.0]}),
        dormant=pd.DataFrame({"week": ["this", "last", "year"], "dormant": [500, 498, None],
                              "became_dormant": [4, 3, None], "reactivated": [6, 2, None]}))
    html = render_html(build(data, "en", "JPY", "acme", GENERATED))
    # new customers 15 vs 8 (+87.5%) vs 10 (+50.0%); net 660,000 vs 600,000 (+10.0%)
    assert re.search(r'New customers</td><td class="num">15</td><td class="num">8</td><td class="num">\+87\.5%</td>'
                     r'<td class="num">10</td><td class="num">\+50\.0%</td>', html)
    assert "Net revenue: ¥660,000, +10.0% vs last week" in html
    assert "web grew most from last week (+4)" in html
    assert re.search(r'\(came back\)</td><td class="num">6</td><td class="num">2</td><td class="num">—', html)


@pytest.mark.parametrize("language", ["ja", "en"])
def test_cancel_headline_wording_follows_the_ratio(full_data, language):
    """Customers who cancel a lot worth less: "only" / にとどまります; worth more: no "only" / に達します."""
    from report.diagnostic import Context, finding_cancel_effect

    c = Context(language, "JPY")
    lower = finding_cancel_effect(full_data, c)
    bands = full_data.cancel_bands.assign(mean_net=[5000.0, 6000.0, 9000.0, 12000.0])
    higher = finding_cancel_effect(DiagnosticData(**{**full_data.__dict__, "cancel_bands": bands}), c)
    if language == "ja":
        assert lower.endswith("倍にとどまります。") and higher.endswith("倍に達します。")
    else:
        assert "per customer, only 0." in lower and "per customer, 1." in higher and "only" not in higher


def test_japanese_report_names_reasons_and_models_in_japanese(full_data):
    from models.bundle import VALUE_MODELS
    from pipelines.validation import REASON_CODES

    assert all(f"reason.{code}" in CATALOGUE for code in REASON_CODES)
    assert all(f"vm.{name}" in CATALOGUE for name in VALUE_MODELS)
    html = render_html(build(full_data, "ja", "JPY", "acme", GENERATED))
    assert "同じ受注番号で内容が異なる行 (duplicate_order_conflict)" in html
    assert "BTYDモデル" in html and "「btyd」" not in html


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_hybrid_champion_shows_what_drives_it(full_data, language):
    m = Messages(language)
    backtest = pd.concat([full_data.backtest.assign(is_champion=False),
                          full_data.backtest.iloc[[0]].assign(model="hybrid_net", value_model="hybrid", mae=5100.0,
                                                              is_champion=True)], ignore_index=True)
    importances = pd.DataFrame({
        "model": "hybrid_net", "feature": ["btyd_net_value", "days_since_last", "acquisition_channel"],
        "rank": [1, 2, 3], "importance": [812.0, 240.5, 3.2], "importance_std": [10.0, 5.0, 1.0],
        "split_gain_share": [0.55, 0.30, 0.02], "training_cutoff": dt.date(2025, 9, 30), "training_rows": 200000,
        "holdout_rows": 50000, "base_model": "bgnbd",
        "base_params": '{"r": 0.81, "alpha": 21.4, "a": 0.9, "b": 2.4, "gamma_gamma_p": 6.1}'})
    hybrid = DiagnosticData(**{**full_data.__dict__, "backtest": backtest, "hybrid_importances": importances})
    html = render_html(build(hybrid, language, "JPY", "acme", GENERATED))
    assert m("hyb.title") in html
    for feature in ("btyd_net_value", "days_since_last", "acquisition_channel"):
        assert m(f"hyb.f.{feature}") in html
    assert Formats(language, "JPY").money(812.0) in html and "200,000" in html and "alpha=21.4" in html
    # chosen by a ranking metric (champion_metric auto under quantile bands): the report says what that means
    by_gini = DiagnosticData(**{**hybrid.__dict__, "backtest": backtest.assign(champion_metric="normalized_gini")})
    html = render_html(build(by_gini, language, "JPY", "acme", GENERATED))
    assert m("mod.why", model="hybrid_net", metric=m("mod.m.normalized_gini"), value="0.810") in html
    assert m("mod.why.ranking") in html
    # another champion: no hybrid block, even with importances in the data
    assert m("hyb.title") not in render_html(build(DiagnosticData(**{**full_data.__dict__,
                                                                     "hybrid_importances": importances}),
                                                   language, "JPY", "acme", GENERATED))
    missing_table = DiagnosticData(**{**hybrid.__dict__, "hybrid_importances": Missing(("model_importances",),
                                                                                        "cvseg backtest")})
    assert "model_importances" in render_html(build(missing_table, language, "JPY", "acme", GENERATED))


def test_lifecycle_segments_come_after_the_value_bands_whatever_their_value(spark, storage):
    from core.tables import SEGMENTS_CURRENT
    from report.sources import segments_value

    values = {"top": 900.0, "middle": 100.0, "dormant": 400.0, "new": 50.0, "low": 10.0}
    rows = [(f"C{i}", segment, 1, AS_OF, value, 0.5, AS_OF) for i, (segment, value) in enumerate(values.items())]
    storage.append("segments_current", spark.createDataFrame(rows, SEGMENTS_CURRENT.schema))
    assert segments_value(storage, None, AS_OF)["group"].tolist() == ["top", "middle", "low", "new", "dormant"]


@pytest.mark.parametrize("language", LANGUAGES)
def test_several_sources_get_a_page_on_channel_sets(full_data, language):
    m = Messages(language)
    f = Formats(language, "JPY")
    rows = pd.DataFrame({
        "year": [2025, 2025, 2025, 2026, 2026],
        "first_source": ["ec", "store", "store", "ec", "store"],
        "source_set": ["ec", "store", "ec+store", "ec", "ec+store"],
        "customers": [300, 200, 100, 50, 50], "converted_90d": [60, 20, 50, 10, 5],
        "net_6m": [3_000_000.0, 1_000_000.0, 2_500_000.0, 400_000.0, 0.0],
        "crossed_customers": [0, 0, 100, 0, 50],
        "is_complete_90d": [True, True, True, True, False], "is_complete_6m": [True, True, True, False, False]})
    html = render_html(build(DiagnosticData(**{**full_data.__dict__, "channel_sets": rows}),
                             language, "JPY", "acme", GENERATED))
    assert m("sec.channels") in html and f'alt="{m("ch.sets.title")}"' in html
    # ec+store: F2 from the complete cohorts only (50 of 100), value per customer 25,000 (2025 only)
    assert f.pct(0.5) in html and f.money(25_000) in html
    # store-first customers who later bought online: 150 of 350
    assert f.pct(150 / 350) in html
    # one source: no such page
    assert m("sec.channels") not in render_html(build(full_data, language, "JPY", "acme", GENERATED))


@pytest.mark.parametrize("language", LANGUAGES)
def test_ltv_by_acquisition_media_page(full_data, language):
    m, f = Messages(language), Formats(language, "JPY")
    channels = pd.DataFrame({"acquisition_channel": ["web", "(unknown)"], "customers": [600, 40],
                             "value": [6_000_000.0, 100_000.0], "value_p10": [5_500_000.0, None],
                             "value_p90": [6_600_000.0, None], "mean_value": [10_000.0, 2_500.0],
                             "f2_rate": [0.25, float("nan")]})
    html = render_html(build(DiagnosticData(**{**full_data.__dict__, "channel_value": channels}),
                             language, "JPY", "acme", GENERATED))
    assert m("sec.channel_value") in html and f'alt="{m("cv.chart.title")}"' in html
    assert m("interval", low=f.money(5_500_000), high=f.money(6_600_000)) in html
    assert f.money(10_000) in html and f.pct(0.25) in html and m("unknown") in html
    # no table yet: the page says what to run; not gathered (None): no page
    absent = DiagnosticData(**{**full_data.__dict__, "channel_value": Missing(("ltv_by_channel",),
                                                                              "cvseg trends --as-of 2026-09-30")})
    html = render_html(build(absent, language, "JPY", "acme", GENERATED))
    assert m("missing", tables="ltv_by_channel", command="cvseg trends --as-of 2026-09-30") in html
    assert m("sec.channel_value") not in render_html(build(full_data, language, "JPY", "acme", GENERATED))


@pytest.mark.parametrize("language", LANGUAGES)
def test_method_notes_say_how_the_purchase_basis_was_chosen(full_data, language):
    """The basis sentence claims a comparison only when the latest backtest ran both bases and its
    champion is on the scores' basis; otherwise it says the configuration named it, or that no
    backtest has compared them yet (gross under auto)."""
    m, f = Messages(language), Formats(language, "JPY")

    def notes(backtest, scored_basis="net"):
        champion = pd.DataFrame({"value_model": ["btyd"], "model_version": ["3"], "customers": [1000],
                                 "purchase_basis": [scored_basis]})
        doc = build(DiagnosticData(**{**full_data.__dict__, "champion": champion, "backtest": backtest}),
                    language, "JPY", "acme", GENERATED)
        return html.unescape(render_html(doc))

    both = pd.DataFrame({"model": ["bgnbd", "bgnbd_net", "cohort"], "value_model": ["btyd", "btyd", "cohort"],
                         "purchase_basis": ["gross", "net", None], "is_champion": [False, True, False],
                         "champion_metric": "spearman", "origin_date": AS_OF, "mae": [1.0, 1.0, 2.0],
                         "spearman": [0.5, 0.6, 0.4]})
    compared = m("met.basis.how.compared", origin=f.date(AS_OF), metric=m("mod.m.spearman"), other="gross")
    assert compared in notes(both)
    assert m("met.basis.how.differs", champion="net") in notes(both, scored_basis="gross")
    one_basis = both[both["purchase_basis"] != "net"].assign(is_champion=[True, False])
    assert m("met.basis.how.set") in notes(one_basis, scored_basis="gross")
    assert m("met.basis.how.none") in notes(Missing(("model_backtest",), "run `cvseg backtest`"))
    page = notes(pd.DataFrame())
    assert m("met.basis.how.none") in page and compared not in page
    assert ("。" + m("met.basis.how.none") if language == "ja" else ". " + m("met.basis.how.none")) in page
