"""The weekly report: this week vs last week vs the same week last year (no Spark here)."""
from __future__ import annotations

import datetime as dt

import pandas as pd

from report import charts
from report.data import WeeklyData
from report.tables import Missing
from report.diagnostic import Context
from report.document import Bullets, Chart, Document, Heading, Paragraph, Table

WEEKS = ("this", "last", "year")


def weekly_kpis(data: WeeklyData) -> pd.DataFrame | None:
    """Rows: metric; columns: this, last, year."""
    frames = []
    if not isinstance(data.orders, Missing):
        frames.append(data.orders.set_index("week")[["orders", "buyers", "gross", "net"]])
    if not isinstance(data.new_f2, Missing):
        frames.append(data.new_f2.groupby("week")[["new_customers", "f2_conversions"]].sum())
    if not frames:
        return None
    table = pd.concat(frames, axis=1).reindex(list(WEEKS)).fillna(0).T
    return table


KPI_ROWS = (("orders", "wk.orders", "count"), ("buyers", "wk.buyers", "people"), ("new_customers", "wk.new", "people"),
            ("f2_conversions", "wk.f2", "people"), ("gross", "wk.gross", "money"), ("net", "wk.net", "money"))


def _value(value: float, kind: str, c: Context) -> str:
    if kind == "money":
        return c.f.money(value)
    return c.f.count(value, people=kind == "people")


def build_weekly(data: WeeklyData, language: str, currency: str, client: str, generated: dt.datetime) -> Document:
    """The weekly report, section by section in reading order. Long on purpose: a flat sequence of
    independent sections on one document, each a few lines; split, the page order would be hidden
    across functions."""
    c = Context(language, currency)
    doc = Document(title=c.m("weekly.title"),
                   subtitle=c.m("subtitle", client=client, as_of=c.f.date(data.as_of),
                                generated=generated.strftime("%Y-%m-%d %H:%M")),
                   language=language)
    ranges = {w: c.m("wk.range", start=c.f.date(start), end=c.f.short_date(end))
              for w, (start, end) in data.windows.items()}
    doc.add(Paragraph(c.m("wk.period", this=ranges["this"], last=ranges["last"], year=ranges["year"]), style="lead"))

    kpis = weekly_kpis(data)
    points = []
    if kpis is not None:
        rows = []
        for key, label, kind in KPI_ROWS:
            if key not in kpis.index:
                continue
            this, last, year = (float(kpis.loc[key, w]) for w in WEEKS)
            rows.append((c.m(label), _value(this, kind, c), _value(last, kind, c), c.f.change(this, last),
                         _value(year, kind, c), c.f.change(this, year)))
            if key in ("net", "new_customers"):
                points.append(c.m("wk.point.change", metric=c.m(label), value=_value(this, kind, c),
                                  wow=c.f.change(this, last), yoy=c.f.change(this, year)))
        header = tuple(c.m(k) for k in ("wk.col.metric", "wk.col.this", "wk.col.last", "wk.col.wow", "wk.col.year",
                                        "wk.col.yoy"))
        kpi_table = Table(header, tuple(rows), numeric=(False,) + (True,) * 5, emphasis_first=True)
    if not isinstance(data.new_f2, Missing) and not data.new_f2.empty:
        by_channel = data.new_f2.pivot_table(index="channel", columns="week", values="new_customers",
                                             aggfunc="sum").reindex(columns=list(WEEKS)).fillna(0)
        if by_channel["this"].sum() > 0:
            top = by_channel["this"].idxmax()
            delta = (by_channel["this"] - by_channel["last"])
            up = delta.idxmax()
            points.append(c.m("wk.point.channel", channel=c.label(top), n=c.f.count(by_channel.loc[top, "this"]),
                              up=c.label(up), delta=f"{delta[up]:+,.0f}"))
    if points:
        doc.add(Heading(c.m("wk.points"), 2), Bullets(tuple(points)))
    doc.add(Heading(c.m("wk.kpis"), 2))
    if kpis is None:
        doc.add(c.missing(data.orders))
    else:
        doc.add(kpi_table)

    doc.add(Heading(c.m("wk.channel.table"), 2))
    if isinstance(data.new_f2, Missing):
        doc.add(c.missing(data.new_f2))
    elif data.new_f2.empty:
        doc.add(Paragraph(c.m("empty", what=c.m("wk.channel.table")), style="note"))
    else:
        pivot = data.new_f2.pivot_table(index="channel", columns="week", values=["new_customers", "f2_conversions"],
                                        aggfunc="sum").fillna(0)
        pivot = pivot.reindex(columns=pd.MultiIndex.from_product([["new_customers", "f2_conversions"], list(WEEKS)])
                              ).fillna(0)
        pivot = pivot.sort_values(("new_customers", "this"), ascending=False)
        labels = [c.label(ch) for ch in pivot.index]
        title = c.m("wk.channel.title")
        png = charts.bars(labels, {c.m("wk.col.this"): pivot[("new_customers", "this")].tolist(),
                                   c.m("wk.col.last"): pivot[("new_customers", "last")].tolist(),
                                   c.m("wk.col.year"): pivot[("new_customers", "year")].tolist()},
                          title=title, xlabel=c.m("wk.channel.x"), ylabel=c.m("axis.customers"),
                          y_fmt=lambda v: f"{v:,.0f}")
        doc.add(Chart(png, title, c.m("wk.channel.aid")))
        header = tuple(c.m(k) for k in ("wk.col.channel", "wk.col.new_this", "wk.col.new_last", "wk.col.new_year",
                                        "wk.col.f2_this", "wk.col.f2_last", "wk.col.f2_year"))
        rows = tuple((label,) + tuple(c.f.number(pivot.loc[ch, (metric, w)])
                                      for metric in ("new_customers", "f2_conversions") for w in WEEKS)
                     for label, ch in zip(labels, pivot.index))
        doc.add(Table(header, rows, numeric=(False,) + (True,) * 6, emphasis_first=True))

    doc.add(Heading(c.m("wk.segments"), 2))
    seg = data.segments
    if isinstance(seg, Missing):
        doc.add(c.missing(seg))
    elif seg.empty:
        doc.add(Paragraph(c.m("empty", what=c.m("wk.segments")), style="note"))
    else:
        pivot = seg.pivot_table(index="segment", columns="week", values=["customers", "active_buyers", "net"],
                                aggfunc="sum").fillna(0)
        pivot = pivot.sort_values(("net", "this") if ("net", "this") in pivot.columns else pivot.columns[0],
                                  ascending=False)
        header = tuple(c.m(k) for k in ("wk.col.segment", "wk.col.customers", "wk.col.active", "wk.col.net_this",
                                        "wk.col.net_last", "wk.col.wow", "wk.col.net_year", "wk.col.yoy"))

        def get(segment, metric, week):
            return float(pivot.loc[segment, (metric, week)]) if (metric, week) in pivot.columns else 0.0
        rows = tuple((c.segment(s), c.f.number(get(s, "customers", "this")), c.f.number(get(s, "active_buyers", "this")),
                      c.f.money(get(s, "net", "this")), c.f.money(get(s, "net", "last")),
                      c.f.change(get(s, "net", "this"), get(s, "net", "last")), c.f.money(get(s, "net", "year")),
                      c.f.change(get(s, "net", "this"), get(s, "net", "year"))) for s in pivot.index)
        doc.add(Table(header, rows, numeric=(False,) + (True,) * 7, emphasis_first=True))

    doc.add(Heading(c.m("wk.dormant"), 2))
    dormant = data.dormant
    if isinstance(dormant, Missing):
        doc.add(c.missing(dormant))
    else:
        by_week = dormant.set_index("week").reindex(list(WEEKS))
        header = (c.m("wk.col.metric"), c.m("wk.col.this"), c.m("wk.col.last"), c.m("wk.col.year"))
        first = dormant.attrs.get("first_valid_from")
        if first is not None and first > data.windows["year"][0]:
            doc.add(Paragraph(c.m("wk.dormant.since", date=c.f.date(first)), style="small"))
        rows = tuple((c.m(label),) + tuple(c.f.number(None if pd.isna(by_week.loc[w, key]) else by_week.loc[w, key])
                                           for w in WEEKS)
                     for key, label in (("dormant", "seg.dormant"), ("became_dormant", "wk.col.into"),
                                        ("reactivated", "wk.col.out")))
        doc.add(Table(header, rows, numeric=(False, True, True, True), emphasis_first=True))
    return doc
