"""The diagnostic report: data -> blocks, section by section (no Spark here)."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd

from core.config import GONE, NO_SEGMENT
from report import charts
from report.data import CANCEL_BAND_LABELS, UNKNOWN, DiagnosticData, Histogram
from report.tables import Missing
from report.document import (Bullets, Chart, Document, Heading, KeyFigures, PageBreak, Paragraph,
                                       Table)
from report.i18n import CATALOGUE, Formats, Messages


class Context:
    """Language, formats and the shared helpers of every section."""

    def __init__(self, language: str, currency: str):
        self.m = Messages(language)
        self.f = Formats(language, currency)

    def missing(self, item: Missing) -> Paragraph:
        return Paragraph(self.m("missing", tables=", ".join(item.tables), command=item.command), style="note")

    def label(self, value: str | None) -> str:
        if value is None or value in (UNKNOWN, "(unknown)") or (isinstance(value, float) and np.isnan(value)):
            return self.m("unknown")
        return str(value)

    def coded(self, prefix: str, code: str) -> str:
        """A code (quarantine reason, value model) in the report's language, the code kept after it."""
        key = f"{prefix}.{code}"
        return f"{self.m(key)} ({code})" if key in CATALOGUE else str(code)

    def interval(self, low, high) -> str:
        """``low – high`` in money, or "—" without an interval (null, or a frame without the columns)."""
        if low is None or high is None or pd.isna(low) or pd.isna(high):
            return self.m("na")
        return self.m("interval", low=self.f.money(low), high=self.f.money(high))

    def segment(self, name: str) -> str:
        """Standard segment names translated; client-defined names shown as configured."""
        key = f"seg.{name}"
        return self.m(key) if key in CATALOGUE else str(name)


# --------------------------------------------------------------------------------------------
# Findings: each returns a sentence or None when its data is missing or too thin
# --------------------------------------------------------------------------------------------
def finding_segment_shift(data: DiagnosticData, c: Context) -> str | None:
    mig = data.migration
    if isinstance(mig, Missing) or mig is None or mig.empty:
        return None
    moved = mig[(mig["from_segment"] != mig["to_segment"])
                & ~mig["from_segment"].isin([NO_SEGMENT]) & ~mig["to_segment"].isin([GONE])]
    if moved.empty:
        return None
    top = moved.sort_values("customers", ascending=False).iloc[0]
    source_total = mig.loc[mig["from_segment"] == top["from_segment"], "customers"].sum()
    return c.m("find.segment_shift", src=c.segment(top["from_segment"]), dst=c.segment(top["to_segment"]),
               n=c.f.count(int(top["customers"])), share=c.f.pct(top["customers"] / source_total))


def finding_best_channel(data: DiagnosticData, c: Context) -> str | None:
    channels = data.new_by_channel
    if isinstance(channels, Missing) or channels.empty:
        return None
    known = channels[(channels["group"] != UNKNOWN) & (channels["customers"] >= 20)]
    if len(known) < 2:
        return None
    ranked = known.sort_values("mean_value", ascending=False)
    best, worst = ranked.iloc[0], ranked.iloc[-1]
    if worst["mean_value"] <= 0:
        return None
    return c.m("find.best_channel", best=c.label(best["group"]), best_value=c.f.money(best["mean_value"]),
               worst=c.label(worst["group"]), worst_value=c.f.money(worst["mean_value"]),
               ratio=c.f.ratio(best["mean_value"] / worst["mean_value"]))


def f2_halves(f2: pd.DataFrame) -> tuple[float, float] | None:
    """F2 rate of the latest six cohorts and of the six before (customer-weighted)."""
    if len(f2) < 12:
        return None
    recent, previous = f2.iloc[-6:], f2.iloc[-12:-6]
    return (recent["converted"].sum() / recent["customers"].sum(),
            previous["converted"].sum() / previous["customers"].sum())


def finding_f2_trend(data: DiagnosticData, c: Context) -> str | None:
    if isinstance(data.f2_cohorts, Missing):
        return None
    halves = f2_halves(data.f2_cohorts)
    if halves is None:
        return None
    recent, previous = halves
    delta = recent - previous
    direction = "find.flat" if abs(delta) < 0.01 else ("find.up" if delta > 0 else "find.down")
    return c.m("find.f2_trend", recent=c.f.pct(recent), previous=c.f.pct(previous), direction=c.m(direction))


def top20_share(deciles: pd.DataFrame) -> float | None:
    if deciles.empty or deciles["value"].sum() <= 0:
        return None
    return float(deciles.loc[deciles["group"] <= 2, "value"].sum() / deciles["value"].sum())


def finding_concentration(data: DiagnosticData, c: Context) -> str | None:
    if isinstance(data.deciles, Missing):
        return None
    share = top20_share(data.deciles)
    if share is None:
        return None
    return c.m("find.concentration", share=c.f.pct(share))


def finding_cancel_effect(data: DiagnosticData, c: Context) -> str | None:
    bands = data.cancel_bands
    if isinstance(bands, Missing) or bands.empty:
        return None
    by_band = bands.set_index("band")
    if 0 not in by_band.index or not ({2, 3} & set(by_band.index)):
        return None
    high = by_band.loc[[b for b in (2, 3) if b in by_band.index]]
    high_mean = float((high["mean_net"] * high["customers"]).sum() / high["customers"].sum())
    low_mean = float(by_band.loc[0, "mean_net"])
    if low_mean <= 0:
        return None
    direction = "lower" if high_mean < low_mean else "higher"
    return c.m(f"find.cancel_effect.{direction}", share=c.f.pct(high["customers"].sum() / bands["customers"].sum()),
               high=c.f.money(high_mean), low=c.f.money(low_mean), ratio=c.f.ratio(high_mean / low_mean))


FINDINGS = (finding_segment_shift, finding_best_channel, finding_f2_trend, finding_concentration,
            finding_cancel_effect)


def headline_findings(data: DiagnosticData, c: Context, n: int = 3) -> list[str]:
    found = []
    for fn in FINDINGS:
        sentence = fn(data, c)
        if sentence:
            found.append(sentence)
        if len(found) == n:
            break
    return found


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
def summary_section(data: DiagnosticData, c: Context) -> list:
    blocks: list = [Heading(c.m("sec.summary"))]
    findings = headline_findings(data, c)
    if findings:
        blocks += [Heading(c.m("sec.findings"), 2), Bullets(tuple(findings), numbered=True)]
    blocks.append(Heading(c.m("sec.kpis"), 2))
    items: list[tuple[str, str]] = []
    if isinstance(data.kpis, Missing):
        blocks.append(c.missing(data.kpis))
    else:
        k = data.kpis
        items += [(c.m("kpi.customers"), c.f.count(k["customers"])),
                  (c.m("kpi.active_12m"), c.f.count(k["active_12m"])),
                  (c.m("kpi.new_12m"), c.f.count(k["new_12m"])),
                  (c.m("kpi.repeat_rate"), c.f.pct(k["repeat_rate"]))]
        items += [(c.m("kpi.gross_total"), c.f.money(k["gross_total"])),
                  (c.m("kpi.cancelled_total"), c.f.money(k["cancelled_total"])),
                  (c.m("kpi.net_total"), c.f.money(k["net_total"])),
                  (c.m("kpi.net_12m"), c.f.money(k["net_12m"]))]
    if not isinstance(data.kpis, Missing) and data.kpis["scored"]:
        items.append((c.m("kpi.predicted"), c.f.money(data.kpis["predicted_net_6m"])))
    if items:
        blocks.append(KeyFigures(tuple(items)))
    segments = data.value_by_segment
    if not isinstance(segments, Missing) and not segments.empty and segments["value"].sum() > 0:
        customers, value = segments["customers"].sum(), segments["value"].sum()
        header = tuple(c.m(k) for k in ("seg.col.segment", "seg.col.customers", "seg.col.customer_share",
                                        "seg.col.value", "seg.col.interval", "seg.col.value_share", "seg.col.mean"))
        rows = tuple((c.segment(r["group"]), c.f.count(r["customers"]), c.f.pct(r["customers"] / customers),
                      c.f.money(r["value"]), c.interval(r.get("value_p10"), r.get("value_p90")),
                      c.f.pct(r["value"] / value), c.f.money(r["mean_value"]))
                     for _, r in segments.iterrows())
        blocks += [Heading(c.m("sec.segments"), 2),
                   Table(header, rows, numeric=(False,) + (True,) * 6, emphasis_first=True)]
    return blocks


def _hist_chart(hist: Histogram, c: Context, title: str, xlabel: str, x_fmt, aid: str) -> Chart:
    png = charts.histogram(hist.edges, hist.counts, title=title, xlabel=xlabel, ylabel=c.m("axis.customers"),
                           x_fmt=x_fmt)
    return Chart(png, title, aid)


def retention_section(data: DiagnosticData, c: Context) -> list:
    blocks: list = [PageBreak(), Heading(c.m("sec.retention"))]
    if not isinstance(data.kpis, Missing):
        k = data.kpis
        blocks.append(Paragraph(c.m("ret.intro", repeat_rate=c.f.pct(k["repeat_rate"]),
                                    repeat=c.f.count(k["repeat_customers"]), customers=c.f.count(k["customers"]),
                                    median_days=c.f.number(k["median_days_to_second"]))))
    f2 = data.f2_cohorts
    if isinstance(f2, Missing):
        blocks.append(c.missing(f2))
    elif not f2.empty:
        labels = [d.strftime("%y-%m") for d in f2["cohort_month"]]
        title = c.m("ret.f2.title")
        png = charts.bars(labels, {title: f2["f2_rate"].tolist()}, title=title, xlabel=c.m("ret.f2.x"),
                          ylabel=c.m("ret.f2.y"), y_fmt=c.f.money_axis, percent=True)
        blocks.append(Chart(png, title, c.m("ret.f2.aid")))
    ret = data.cohort_retention
    if isinstance(ret, Missing):
        blocks.append(c.missing(ret))
    elif not ret.empty:
        matrix_df = ret.pivot_table(index="cohort_month", columns="months_since_first_order",
                                    values="retention_rate", aggfunc="first").sort_index()
        matrix_df = matrix_df.drop(columns=[0], errors="ignore")   # month 0 is 100% by definition
        title = c.m("ret.heat.title")
        png = charts.heatmap(matrix_df.to_numpy(dtype=float), list(matrix_df.index),
                             [str(col) for col in matrix_df.columns], title=title, xlabel=c.m("ret.heat.x"),
                             ylabel=c.m("ret.heat.y"), cell_fmt=lambda v: f"{100 * v:.0f}", percent=True)
        blocks.append(Chart(png, title, c.m("ret.heat.aid")))
    gap = data.gap_hist
    if isinstance(gap, Missing):
        blocks.append(c.missing(gap))
    elif gap is not None:
        blocks.append(_hist_chart(gap, c, c.m("ret.gap.title"), c.m("ret.gap.x"), lambda v: f"{v:,.0f}",
                                  c.m("ret.gap.aid", median=c.f.number(gap.median), cap=c.f.number(gap.cap))))
    return blocks


def purchasing_section(data: DiagnosticData, c: Context) -> list:
    blocks: list = [PageBreak(), Heading(c.m("sec.purchasing"))]
    aov = data.aov_hist
    if isinstance(aov, Missing):
        blocks.append(c.missing(aov))
    elif aov is not None:
        blocks.append(_hist_chart(aov, c, c.m("pur.aov.title"), c.m("pur.aov.x", unit=c.f.unit), c.f.money_axis,
                                  c.m("pur.aov.aid", median=c.f.money(aov.median), cap=c.f.money(aov.cap))))
    cancel = data.cancel_hist
    if isinstance(cancel, Missing):
        blocks.append(c.missing(cancel))
    elif cancel is not None:
        title = c.m("pur.cancel.title")
        png = charts.histogram(cancel.edges, cancel.counts, title=title, xlabel=c.m("pur.cancel.x"),
                               ylabel=c.m("axis.customers"), x_fmt=lambda v: f"{100 * v:.0f}", open_ended=False)
        blocks.append(Chart(png, title, c.m("pur.cancel.aid", zero=c.f.pct(data.zero_cancel_share))))
    bands = data.cancel_bands
    if isinstance(bands, Missing):
        blocks.append(c.missing(bands))
    elif not bands.empty:
        title = c.m("pur.band.title")
        labels = [CANCEL_BAND_LABELS[int(b)] for b in bands["band"]]
        png = charts.bars(labels, {c.m("pur.band.gross"): bands["mean_gross"].tolist(),
                                   c.m("pur.band.net"): bands["mean_net"].tolist()},
                          title=title, xlabel=c.m("pur.band.x"), ylabel=c.m("pur.band.y", unit=c.f.unit),
                          y_fmt=c.f.money_axis, annotations=[c.f.count(n) for n in bands["customers"]])
        blocks.append(Chart(png, title, c.m("pur.band.aid")))
    segments = data.value_by_segment
    if isinstance(segments, Missing):
        blocks.append(c.missing(segments))
    elif not segments.empty:
        title = c.m("pur.seg.title")
        png = charts.bars([c.segment(s) for s in segments["group"]], {title: segments["mean_value"].tolist()},
                          title=title, xlabel=c.m("pur.seg.x"), ylabel=c.m("pur.band.y", unit=c.f.unit),
                          y_fmt=c.f.money_axis, annotations=[c.f.count(n) for n in segments["customers"]])
        blocks.append(Chart(png, title, c.m("pur.seg.aid")))
    return blocks


def _per_new_chart(frame: pd.DataFrame, c: Context, title: str, ylabel: str) -> Chart:
    ranked = frame.sort_values("mean_value", ascending=False)
    png = charts.hbars([c.label(g) for g in ranked["group"]], ranked["mean_value"].tolist(),
                       [c.f.count(n) for n in ranked["customers"]], title=title,
                       xlabel=c.m("pro.per_new.x", unit=c.f.unit), ylabel=ylabel, x_fmt=c.f.money_axis)
    return Chart(png, title, c.m("pro.per_new.aid", n=c.f.count(int(frame["customers"].sum()))))


def profitability_section(data: DiagnosticData, c: Context) -> list:
    blocks: list = [PageBreak(), Heading(c.m("sec.profitability"))]
    dist = data.value_hist
    if isinstance(dist, Missing):
        blocks.append(c.missing(dist))
    elif dist is not None:
        blocks.append(_hist_chart(dist, c, c.m("pro.dist.title"), c.m("pro.dist.x", unit=c.f.unit), c.f.money_axis,
                                  c.m("pro.dist.aid", median=c.f.money(dist.median), mean=c.f.money(dist.mean),
                                      cap=c.f.money(dist.cap))))
    par = data.pareto
    if isinstance(par, Missing):
        blocks.append(c.missing(par))
    elif not par.empty and par["value"].sum() > 0:
        customer_share = (par["customers"] / par["customers"].sum()).tolist()
        value_share = (par["value"] / par["value"].sum()).tolist()
        if data.pareto_kind == "segment":
            labels = [c.segment(s) for s in par["group"]]
            xlabel = c.m("pro.pareto.x.segment")
        else:
            labels = [str(int(g)) for g in par["group"]]
            xlabel = c.m("pro.pareto.x.decile")
        title = c.m("pro.pareto.title")
        png = charts.pareto(labels, customer_share, value_share, title=title, xlabel=xlabel, ylabel=c.m("pro.pareto.y"),
                            names=(c.m("pro.pareto.customers"), c.m("pro.pareto.value"), c.m("pro.pareto.cum")))
        blocks.append(Chart(png, title, c.m("pro.pareto.aid", group=labels[0], cust=c.f.pct(customer_share[0]),
                                           value=c.f.pct(value_share[0]))))
    for frame, key_title, key_y in ((data.new_by_channel, "pro.channel.title", "pro.channel.y"),
                                    (data.new_by_category, "pro.category.title", "pro.category.y")):
        if isinstance(frame, Missing):
            blocks.append(c.missing(frame))
        elif not frame.empty:
            blocks.append(_per_new_chart(frame, c, c.m(key_title), c.m(key_y)))
    return blocks


def channel_value_section(data: DiagnosticData, c: Context) -> list:
    """LTV by acquisition media (ltv_by_channel): per channel, customers, the predicted 6-month value
    total with its 80% interval, the mean per customer and F2 within 90 days."""
    frame = data.channel_value
    if frame is None:
        return []
    blocks: list = [PageBreak(), Heading(c.m("sec.channel_value"))]
    if isinstance(frame, Missing):
        return blocks + [c.missing(frame)]
    blocks.append(Paragraph(c.m("cv.intro")))
    header = tuple(c.m(k) for k in ("pro.channel.y", "seg.col.customers", "seg.col.value", "cv.col.interval",
                                    "seg.col.mean", "ch.col.f2"))
    rows = tuple((c.label(r["acquisition_channel"]), c.f.count(r["customers"]), c.f.money(r["value"]),
                  c.interval(r["value_p10"], r["value_p90"]), c.f.money(r["mean_value"]),
                  c.m("na") if pd.isna(r["f2_rate"]) else c.f.pct(r["f2_rate"]))
                 for _, r in frame.iterrows())
    blocks.append(Table(header, rows, numeric=(False,) + (True,) * 5, emphasis_first=True))
    title = c.m("cv.chart.title")
    png = charts.hbars([c.label(g) for g in frame["acquisition_channel"]], frame["value"].tolist(),
                       [c.f.count(n) for n in frame["customers"]], title=title,
                       xlabel=c.m("cv.chart.x", unit=c.f.unit), ylabel=c.m("pro.channel.y"), x_fmt=c.f.money_axis,
                       ranges=(frame["value_p10"].tolist(), frame["value_p90"].tolist()))
    blocks.append(Chart(png, title, c.m("cv.chart.aid")))
    return blocks


def trends_section(data: DiagnosticData, c: Context) -> list:
    blocks: list = [PageBreak(), Heading(c.m("sec.trends"))]
    yearly = data.yearly
    if isinstance(yearly, Missing):
        blocks.append(c.missing(yearly))
    elif not yearly.empty:
        years = [str(int(y)) + ("*" if partial else "") for y, partial in zip(yearly["year"], yearly["is_partial_year"])]
        title = c.m("tr.cust.title")
        png = charts.stacked(years, {c.m("tr.new"): yearly["new_customers"].tolist(),
                                     c.m("tr.existing"): yearly["existing_customers"].tolist()},
                             title=title, xlabel=c.m("tr.cust.x"), ylabel=c.m("axis.customers"),
                             y_fmt=lambda v: f"{v:,.0f}")
        partial_note = c.m("tr.partial") if yearly["is_partial_year"].any() else ""
        blocks.append(Chart(png, title, c.m("tr.cust.aid") + partial_note))
        title = c.m("tr.rev.title")
        png = charts.stacked(years, {c.m("tr.new"): yearly["new_customer_net"].tolist(),
                                     c.m("tr.existing"): yearly["existing_customer_net"].tolist()},
                             title=title, xlabel=c.m("tr.cust.x"), ylabel=c.m("tr.rev.y", unit=c.f.unit),
                             y_fmt=c.f.money_axis)
        blocks.append(Chart(png, title, c.m("tr.rev.aid") + partial_note))
    cat = data.yearly_category
    if isinstance(cat, Missing):
        blocks.append(c.missing(cat))
    elif not cat.empty:
        totals = cat.groupby("category")["net"].sum().sort_values(ascending=False)
        keep = list(totals.index[:6])
        pivot = cat[cat["category"].isin(keep)].pivot_table(index="year", columns="category", values="net",
                                                            aggfunc="sum").fillna(0)[keep]
        title = c.m("tr.cat.title")
        partial = set(cat.loc[cat["is_partial_year"], "year"]) if "is_partial_year" in cat else set()
        png = charts.bars([str(int(y)) + ("*" if y in partial else "") for y in pivot.index],
                          {c.label(k): pivot[k].tolist() for k in keep},
                          title=title, xlabel=c.m("tr.cust.x"), ylabel=c.m("tr.rev.y", unit=c.f.unit),
                          y_fmt=c.f.money_axis)
        blocks.append(Chart(png, title, c.m("tr.cat.aid") + (c.m("tr.partial") if partial else "")))
    weekly = data.weekly_segment
    if isinstance(weekly, Missing):
        blocks.append(c.missing(weekly))
    elif not weekly.empty:
        pivot = weekly.pivot_table(index="week_start", columns="segment", values="net", aggfunc="sum").fillna(0)
        order = pivot.sum().sort_values(ascending=False).index
        title = c.m("tr.week.title")
        png = charts.lines(list(pivot.index), {c.segment(s): pivot[s].tolist() for s in order}, title=title,
                           xlabel=c.m("tr.week.x"), ylabel=c.m("tr.week.y", unit=c.f.unit), y_fmt=c.f.money_axis,
                           x_labels=[c.f.short_date(d) for d in pivot.index])
        blocks.append(Chart(png, title, c.m("tr.week.aid")))
    return blocks


def channels_section(data: DiagnosticData, c: Context) -> list:
    """With several sources: customers by the sources they bought from, F2 and six-month value per
    source set, and how many crossed from their first source to another (trend_channel_sets)."""
    frame = data.channel_sets
    if frame is None or frame.empty:
        return []
    blocks: list = [PageBreak(), Heading(c.m("sec.channels"))]
    sets = list(frame.groupby("source_set")["customers"].sum().sort_values(ascending=False).index)
    pivot = frame.pivot_table(index="year", columns="source_set", values="customers", aggfunc="sum").fillna(0)
    years = [str(int(y)) for y in pivot.index]
    png = charts.stacked(years, {s: pivot[s].tolist() for s in sets if s in pivot}, title=c.m("ch.sets.title"),
                         xlabel=c.m("tr.cust.x"), ylabel=c.m("axis.customers"), y_fmt=lambda v: f"{v:,.0f}")
    blocks.append(Chart(png, c.m("ch.sets.title"), c.m("ch.sets.aid")))
    # F2 and six-month value from complete cohorts only (a cohort of last month has had no 90 days)
    f2 = frame[frame["is_complete_90d"]].groupby("source_set")[["customers", "converted_90d"]].sum()
    value = frame[frame["is_complete_6m"]].groupby("source_set")[["customers", "net_6m"]].sum()
    totals = frame.groupby("source_set")["customers"].sum()

    def per_customer(table: pd.DataFrame, source_set: str, column: str, fmt) -> str:
        if source_set not in table.index or not table.loc[source_set, "customers"]:
            return c.m("na")
        return fmt(table.loc[source_set, column] / table.loc[source_set, "customers"])

    header = tuple(c.m(k) for k in ("ch.col.set", "ch.col.customers", "ch.col.f2", "ch.col.value"))
    rows = tuple((s, c.f.count(totals[s]), per_customer(f2, s, "converted_90d", c.f.pct),
                  per_customer(value, s, "net_6m", c.f.money)) for s in sets)
    blocks.append(Table(header, rows, numeric=(False, True, True, True), emphasis_first=True))
    crossed = frame.groupby("first_source")[["customers", "crossed_customers"]].sum()
    header = tuple(c.m(k) for k in ("ch.col.first", "ch.col.customers", "ch.col.crossed"))
    rows = tuple((source, c.f.count(r["customers"]), c.f.pct(r["crossed_customers"] / r["customers"]))
                 for source, r in crossed.iterrows() if r["customers"])
    blocks += [Table(header, rows, numeric=(False, True, True)), Paragraph(c.m("ch.crossed.aid"))]
    return blocks


METRICS = (("mae", "money"), ("rmse", "money"), ("abs_total_error_pct", "num"), ("spearman", "r"),
           ("normalized_gini", "r"), ("top_decile_capture", "pct"), ("top20_capture", "pct"),
           # share of customers inside their 80% value interval (target ~80%; none for cohort / naive)
           ("interval_coverage", "pct"))
#: champion metrics that measure how customers are ordered, not how exact the amounts are
#: (models.metrics.METRIC_DIRECTION's higher-is-better ones; the report imports core and pipelines only)
RANKING_METRICS = ("spearman", "normalized_gini", "top_decile_capture", "top20_capture")


def _metric(value, kind: str, c: Context) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return c.m("na")
    if kind == "money":
        return c.f.money(value)
    if kind == "pct":
        return c.f.pct(value)
    if kind == "num":
        return f"{value:.1f}%"
    return f"{value:.3f}"


def _metric_label(metric: str, c: Context) -> str:
    """A backtest metric's name in the report's language (its column name when the report has none)."""
    return c.m(f"mod.m.{metric}") if metric in dict(METRICS) else metric


def models_section(data: DiagnosticData, c: Context) -> list:
    blocks: list = [PageBreak(), Heading(c.m("sec.models"))]
    champ = data.champion
    if isinstance(champ, Missing):
        blocks.append(c.missing(champ))
    elif not champ.empty:
        row = champ.iloc[0]
        blocks.append(Paragraph(c.m("mod.champion", model=c.coded("vm", row["value_model"]),
                                    version=row["model_version"])))
    bt = data.backtest
    if isinstance(bt, Missing):
        blocks.append(c.missing(bt))
        return blocks
    if bt.empty:
        return blocks
    champion_rows = bt[bt["is_champion"]]
    champion_model = champion_rows.iloc[0]["model"] if not champion_rows.empty else None
    if champion_model is not None:
        metric = champion_rows.iloc[0]["champion_metric"]
        kind = dict(METRICS).get(metric, "r")
        blocks.append(Paragraph(c.m("mod.why", model=champion_model, metric=_metric_label(metric, c),
                                    value=_metric(champion_rows.iloc[0][metric], kind, c))))
        if metric in RANKING_METRICS:             # say what a ranking champion means for the totals
            blocks.append(Paragraph(c.m("mod.why.ranking")))
    header = (c.m("mod.table.model"),) + tuple(c.m(f"mod.m.{key}") for key, _ in METRICS)
    rows = tuple((row["model"] + (" ★" if row["model"] == champion_model else ""),)
                 + tuple(_metric(row.get(key), kind, c) for key, kind in METRICS) for _, row in bt.iterrows())
    blocks += [Table(header, rows, numeric=(False,) + (True,) * len(METRICS), emphasis_first=True),
               Paragraph(c.m("mod.metrics.aid"), style="small")]
    dec = data.backtest_deciles
    if isinstance(dec, Missing):
        blocks.append(c.missing(dec))
    elif not dec.empty:
        reference = champion_model if champion_model in set(dec["model"]) else dec["model"].iloc[0]
        ref = dec[dec["model"] == reference].sort_values("decile")
        models = {name: grp.sort_values("decile")["mean_predicted"].tolist() for name, grp in dec.groupby("model")}
        title = c.m("mod.cal.title")
        png = charts.calibration(ref["decile"].tolist(), ref["mean_actual"].tolist(), models, title=title,
                                 xlabel=c.m("mod.cal.x"), ylabel=c.m("mod.cal.y", unit=c.f.unit),
                                 y_fmt=c.f.money_axis, actual_label=c.m("mod.cal.actual"), champion=champion_model)
        blocks.append(Chart(png, title, c.m("mod.cal.aid")))
    if champion_model is not None and champion_rows.iloc[0]["value_model"] == "hybrid":
        blocks += hybrid_block(data.hybrid_importances, champion_model, c)
    return blocks


def hybrid_block(importances: pd.DataFrame | Missing, champion_model: str, c: Context) -> list:
    """The hybrid champion's inputs by permutation importance on the holdout, beside its BTYD base."""
    if isinstance(importances, Missing):
        return [c.missing(importances)]
    rows_df = importances[importances["model"] == champion_model].sort_values("rank") \
        if not importances.empty else importances
    if rows_df.empty:
        return []
    first = rows_df.iloc[0]
    blocks: list = [Heading(c.m("hyb.title"), level=2),
                    Paragraph(c.m("hyb.lead", rows=c.f.number(first["training_rows"]),
                                  train=c.f.date(first["training_cutoff"])))]
    header = (c.m("hyb.col.rank"), c.m("hyb.col.feature"), c.m("hyb.col.importance"), c.m("hyb.col.gain"))
    rows = tuple((str(int(r["rank"])), c.m(f"hyb.f.{r['feature']}") if f"hyb.f.{r['feature']}" in CATALOGUE
                  else r["feature"], c.f.money(r["importance"]),
                  c.m("na") if pd.isna(r["split_gain_share"]) else c.f.pct(r["split_gain_share"]))
                 for _, r in rows_df.iterrows())
    blocks.append(Table(header, rows, numeric=(True, False, True, True)))
    params = json.loads(first["base_params"]) if isinstance(first["base_params"], str) else {}
    shown = ", ".join(f"{k.removeprefix('gamma_gamma_')}={v:.3g}" for k, v in params.items())
    blocks += [Paragraph(c.m("hyb.base", model=first["base_model"], params=shown or c.m("na"))),
               Paragraph(c.m("hyb.aid"), style="small")]
    return blocks


def generations_section(data: DiagnosticData, c: Context) -> list:
    blocks: list = [PageBreak(), Heading(c.m("sec.generations"))]
    mig = data.migration
    if isinstance(mig, Missing) or isinstance(data.generation_review, Missing):
        # both tables are written at the cut of a second generation, not by the first `cvseg segments`
        blocks.append(Paragraph(c.m("gen.second", tables=", ".join(
            t for t, v in (("segment_migration", mig), ("generation_review", data.generation_review))
            if isinstance(v, Missing))), style="note"))
    if not isinstance(mig, Missing) and not mig.empty:
        matrix_df = mig.pivot_table(index="from_segment", columns="to_segment", values="customers",
                                    aggfunc="sum").fillna(0)
        title = c.m("gen.matrix.title")
        png = charts.heatmap(matrix_df.to_numpy(dtype=float), [c.segment(s) for s in matrix_df.index],
                             [c.segment(s) for s in matrix_df.columns], title=title, xlabel=c.m("gen.matrix.x"),
                             ylabel=c.m("gen.matrix.y"), cell_fmt=lambda v: f"{v:,.0f}")
        blocks.append(Chart(png, title, c.m("gen.matrix.aid")))
    review = data.generation_review
    if not isinstance(review, Missing) and not review.empty:
        title = c.m("gen.review.title")
        png = charts.bars([c.segment(s) for s in review["segment"]],
                          {c.m("gen.review.pred"): review["predicted_net_value"].tolist(),
                           c.m("gen.review.actual"): review["actual_net_value"].tolist()},
                          title=title, xlabel=c.m("pur.seg.x"), ylabel=c.m("gen.review.y", unit=c.f.unit),
                          y_fmt=c.f.money_axis)
        blocks.append(Chart(png, title, c.m("gen.review.aid", generation=int(review["generation_id"].iloc[0]),
                                           pred=c.f.money(review["predicted_net_value"].sum()),
                                           actual=c.f.money(review["actual_net_value"].sum()))))
    return blocks


def _basis_choice(bt: pd.DataFrame | Missing, scored_basis: str, c: Context) -> str:
    """How the scores' purchase basis came about, as far as the latest backtest tells: compared with
    the other basis and chosen, named by the configuration, or gross for want of a backtest (the
    report does not claim a comparison that never ran)."""
    if isinstance(bt, Missing) or bt.empty:
        return c.m("met.basis.how.none")
    bases = set(bt["purchase_basis"].dropna()) if "purchase_basis" in bt.columns else set()
    champion = bt[bt["is_champion"]]
    if not {"gross", "net"} <= bases or champion.empty:
        return c.m("met.basis.how.set")
    row = champion.iloc[0]
    if row["purchase_basis"] != scored_basis:
        return c.m("met.basis.how.differs", champion=row["purchase_basis"])
    return c.m("met.basis.how.compared", origin=c.f.date(row["origin_date"]),
               metric=_metric_label(row["champion_metric"], c), other="net" if scored_basis == "gross" else "gross")


def method_section(data: DiagnosticData, c: Context) -> list:
    blocks: list = [PageBreak(), Heading(c.m("sec.method")), Paragraph(c.m("met.asof", as_of=c.f.date(data.as_of)))]
    if isinstance(data.kpis, Missing):
        blocks.append(c.missing(data.kpis))
    else:
        k = data.kpis
        blocks.append(Paragraph(c.m("met.range", first=c.f.date(k["first_order_date"]),
                                    last=c.f.date(k["last_order_date"]), orders=c.f.number(k["orders_total"]))))
    q = data.quarantine
    if isinstance(q, Missing):
        blocks.append(c.missing(q))
    else:
        runs = q["runs"]
        blocks.append(Paragraph(c.m("met.ingest", runs=c.f.number(runs["runs"]), input=c.f.number(runs["input_rows"]),
                                    accepted=c.f.number(runs["accepted_rows"]),
                                    quarantined=c.f.number(runs["quarantined_rows"]),
                                    dups=c.f.number(runs["exact_duplicate_rows"]))))
        if q["reasons"].empty:
            blocks.append(Paragraph(c.m("met.none")))
        else:
            blocks.append(Table((c.m("met.reason"), c.m("met.rows")),
                                tuple((c.coded("reason", str(r["reason"])), c.f.number(r["rows"]))
                                      for _, r in q["reasons"].iterrows()),
                                title=c.m("met.quarantine"), numeric=(False, True)))
    champ = data.champion
    if not isinstance(champ, Missing) and not champ.empty and "purchase_basis" in champ.columns:
        by_basis = champ.groupby("purchase_basis")["customers"].sum()
        scored_basis = "net" if by_basis.get("net", 0) + by_basis.get("net_rule", 0) > by_basis.get("gross", 0) \
            else "gross"
        basis = c.m(f"met.basis.{scored_basis}", by_rule=c.f.number(int(by_basis.get("net_rule", 0))))
        # Japanese sentences follow one another without a space
        blocks.append(Paragraph(basis + ("" if basis.endswith("。") else " ")
                                + _basis_choice(data.backtest, scored_basis, c)))
    blocks += [Heading(c.m("met.defs"), 2),
               Bullets(tuple(c.m(k) for k in ("def.ltv", "def.p_alive", "def.repeat", "def.f2", "def.active",
                                              "def.revenue", "def.cancel", "def.segment", "def.channel")))]
    return blocks


SECTIONS = (summary_section, retention_section, purchasing_section, profitability_section, channel_value_section,
            trends_section, channels_section, models_section, generations_section, method_section)


def build_diagnostic(data: DiagnosticData, language: str, currency: str, client: str,
                     generated: dt.datetime) -> Document:
    c = Context(language, currency)
    doc = Document(title=c.m("diag.title"),
                   subtitle=c.m("subtitle", client=client, as_of=c.f.date(data.as_of),
                                generated=generated.strftime("%Y-%m-%d %H:%M")),
                   language=language)
    for section in SECTIONS:
        doc.add(*section(data, c))
    return doc
