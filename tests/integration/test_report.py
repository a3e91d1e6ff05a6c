"""The diagnostic and weekly reports rendered from a small demo-like warehouse, in ja and en.

One warehouse for the module (2,000 generated customers through the engine's own stages:
generate -> ingest -> features -> fit -> score, then segments / trends / backtest when those
stages exist), and each report's data gathered once and rendered in both languages.
Expected numbers come from independent Spark queries of the tables, not from the report code.
"""
from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path
import subprocess

import numpy as np
import pytest
from pyspark.sql import functions as F

from core.tables import producing_command
from report import build, collect, write
from report.data import week_windows
from report.tables import table_available
from report.i18n import Formats, Messages

AS_OF = dt.date(2026, 9, 30)
N_CUSTOMERS = 2000
LANGUAGES = ("ja", "en")
SECTIONS = ("sec.summary", "sec.retention", "sec.purchasing", "sec.profitability", "sec.trends", "sec.models",
            "sec.generations", "sec.method")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(spark, tmp_path_factory):
    """A warehouse built like `cvseg demo` does, on 2,000 customers."""
    from conf import __file__ as conf_file
    from core.config import load_config
    from core.storage import Storage
    from pipelines.features import run_features
    from datagen.generate import generate
    from pipelines.ingest import run_ingest
    from pipelines.ltv import fit_btyd_bundles, run_score

    root = tmp_path_factory.mktemp("report")
    conf_path = f"{conf_file.rsplit('/', 1)[0]}/examples/synthetic.yaml"
    config = load_config(conf_path, [f"storage.warehouse={root / 'warehouse'}",
                                     f"source.path={root / 'export' / 'orders'}",
                                     "models.purchase_models=[bgnbd]"])
    storage = Storage(spark, config.storage.warehouse, backend="deltalake")
    generate(spark, n_customers=N_CUSTOMERS, seed=11, end_date=AS_OF, out_dir=str(root / "export"), fmt="csv")
    run_ingest(spark, storage, config.source, config.validation, config.business.timezone, AS_OF,
               path=str(root / "export" / "orders"))
    run_features(storage, AS_OF, config.features)
    features_df = storage.read("customer_features").where(F.col("as_of_date") == F.lit(AS_OF))
    fitted = fit_btyd_bundles(features_df, ("bgnbd",), config.features.time_unit, config.models.horizon_months)
    run_score(storage, AS_OF, fitted.bundles["bgnbd"], "unregistered")
    try:                                    # stage 3, once it exists in this checkout
        from pipelines.segments import run_segments
    except ImportError:
        run_segments = None
    if run_segments is not None:
        run_segments(storage, AS_OF, config.segments)
    try:
        from pipelines.trends import run_trends
    except ImportError:
        run_trends = None
    if run_trends is not None:
        run_trends(storage, AS_OF, config.trends)
    return {"storage": storage, "config": config, "root": root}


@pytest.fixture(scope="module")
def reports(engine):
    """Both reports, both languages: {(kind, lang): {"html": text, "pdf": path, "pdf_text": text}}."""
    from pypdf import PdfReader

    out_dir = engine["root"] / "reports"
    out_dir.mkdir()
    rendered = {}
    for weekly in (False, True):
        data = collect(engine["storage"], AS_OF, weekly)
        kind = "weekly" if weekly else "diagnostic"
        for language in LANGUAGES:
            doc = build(data, language, "JPY", "test-client")
            html_path, pdf_path = write(doc, out_dir, f"{kind}_{language}")
            pdf_text = "\n".join(page.extract_text() for page in PdfReader(str(pdf_path)).pages)
            rendered[(kind, language)] = {"html": html_path.read_text(encoding="utf-8"), "pdf": pdf_path,
                                          "pdf_text": pdf_text, "data": data}
    return rendered


def _squash(text: str) -> str:
    """PDF text extraction breaks lines inside wrapped paragraphs: compare without whitespace."""
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("language", LANGUAGES)
def test_diagnostic_pdf_and_html_have_every_section(reports, language):
    m = Messages(language)
    report = reports[("diagnostic", language)]
    pdf_text = _squash(report["pdf_text"])
    assert _squash(m("diag.title")) in pdf_text
    for key in SECTIONS:
        assert _squash(m(key)) in pdf_text, f"section {m(key)!r} missing from the {language} PDF"
        assert m(key) in report["html"]
    assert report["html"].count("data:image/png;base64,") >= 8   # the charts of sections 1-4 and 8


@pytest.mark.parametrize("kind", ("diagnostic", "weekly"))
@pytest.mark.parametrize("language", LANGUAGES)
def test_html_is_self_contained(reports, kind, language):
    html = reports[(kind, language)]["html"]
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "@import" not in html and "url(" not in html
    sources = re.findall(r'\bsrc="([^"]*)"', html)
    assert all(s.startswith("data:image/png;base64,") for s in sources), sources
    assert f'<html lang="{language}">' in html


def test_summary_numbers_equal_the_tables(engine, reports):
    storage = engine["storage"]
    features_df = storage.read("customer_features").where(F.col("as_of_date") == F.lit(AS_OF))
    scores_df = storage.read("customer_scores").where(F.col("as_of_date") == F.lit(AS_OF))
    f = features_df.agg(F.count(F.lit(1)).alias("customers"),
                        F.sum(F.when(F.col("orders_12m") > 0, 1).otherwise(0)).alias("active"),
                        F.sum("gross_amount").alias("gross"), F.sum("cancelled_amount").alias("cancelled"),
                        F.sum("net_12m").alias("net_12m")).first()
    predicted = scores_df.agg(F.sum("predicted_net_value")).first()[0]
    # the to-date net revenue must equal the orders themselves, not just the features
    net_orders = storage.read("orders").where(F.col("order_date") <= F.lit(AS_OF)).agg(F.sum("net_amount")).first()[0]
    assert f["customers"] == N_CUSTOMERS
    for language in LANGUAGES:
        fmt = Formats(language, "JPY")
        report = reports[("diagnostic", language)]
        kpis = report["data"].kpis
        assert kpis["customers"] == f["customers"] and kpis["active_12m"] == f["active"]
        assert kpis["net_total"] == pytest.approx(net_orders, rel=1e-9)
        expected = [fmt.count(f["customers"]), fmt.count(f["active"]), fmt.money(f["gross"]),
                    fmt.money(f["cancelled"]), fmt.money(net_orders), fmt.money(f["net_12m"]), fmt.money(predicted)]
        pdf_text = _squash(report["pdf_text"])
        for text in expected:
            assert text in report["html"], (language, text)
            assert _squash(text) in pdf_text, (language, text)
    assert Formats("ja", "JPY").money(1234567) == "1,234,567円"
    assert Formats("en", "JPY").money(1234567) == "¥1,234,567"


def test_headline_findings_are_sentences_from_the_data(engine, reports):
    from pyspark.sql import Window

    storage = engine["storage"]
    features_df = storage.read("customer_features").where(F.col("as_of_date") == F.lit(AS_OF))
    scores_df = storage.read("customer_scores").where(F.col("as_of_date") == F.lit(AS_OF))
    # best channel by mean predicted value of customers acquired in the last 12 months (20+ of them)
    channels = (features_df.where(F.col("first_order_date") > F.add_months(F.lit(AS_OF), -12))
                .join(scores_df.select("customer_id", "predicted_net_value"), "customer_id", "inner")
                .groupBy("acquisition_channel")
                .agg(F.count(F.lit(1)).alias("n"), F.avg("predicted_net_value").alias("v"))
                .where((F.col("n") >= 20) & F.col("acquisition_channel").isNotNull()).orderBy(F.desc("v")).collect())
    best, worst = channels[0], channels[-1]
    # exact share of predicted value held by the top 20% of customers (2,000 rows: a global sort is fine here)
    ranked = scores_df.select("predicted_net_value", F.percent_rank().over(
        Window.orderBy(F.desc("predicted_net_value"))).alias("rank"))
    top20 = ranked.agg(F.sum(F.when(F.col("rank") < 0.2, F.col("predicted_net_value"))) / F.sum("predicted_net_value")).first()[0]
    for language in LANGUAGES:
        fmt = Formats(language, "JPY")
        html = reports[("diagnostic", language)]["html"]
        findings = re.search(r'<ol class="findings">(.*?)</ol>', html, re.S)
        assert findings, "no headline findings on the summary page"
        items = re.findall(r"<li>(.*?)</li>", findings.group(1))
        assert len(items) == 3
        channel_item = [i for i in items if fmt.money(best["v"]) in i]
        assert channel_item and best["acquisition_channel"] in channel_item[0], (items, best)
        assert worst["acquisition_channel"] in channel_item[0] and fmt.money(worst["v"]) in channel_item[0]
        before, after = (re.escape(part) for part in Messages(language)("find.concentration", share="@").split("@"))
        share = [float(x) for i in items for x in re.findall(before + r"(\d+\.\d)%" + after, i)]
        if share:   # the concentration finding, when it is among the three: approximate deciles vs exact
            assert abs(share[0] - 100 * top20) < 1.5, (share, top20)
    deciles = reports[("diagnostic", "en")]["data"].deciles
    assert deciles["customers"].sum() == N_CUSTOMERS        # every scored customer in exactly one decile


def test_missing_tables_are_named_with_their_command(engine, reports):
    storage = engine["storage"]
    html = reports[("diagnostic", "en")]["html"] + reports[("weekly", "en")]["html"]
    for table in ("trend_yearly", "trend_weekly_segment", "model_backtest", "segment_migration",
                  "generation_review", "trend_cohort_retention"):
        command = producing_command(table, AS_OF)
        if table_available(storage, table):
            assert f"table {table} does not exist" not in html
        elif table in ("segment_migration", "generation_review"):   # written at a second generation's cut
            assert re.search(rf"\b{table}\b[^.]* are written when the second segment generation is cut", html), table
        else:
            assert re.search(rf"table [^.]*\b{table}\b[^.]*does not exist\. `{re.escape(command)}`", html), table


def test_weekly_numbers_equal_the_orders(engine, reports):
    storage = engine["storage"]
    start, end = week_windows(AS_OF)["this"]
    assert end.weekday() == 6 and end <= AS_OF       # a complete Monday-Sunday week
    week = storage.read("orders").where(F.col("order_date").between(F.lit(start), F.lit(end))).agg(
        F.count(F.lit(1)).alias("orders"), F.sum("net_amount").alias("net")).first()
    new = (storage.read("customer_features").where(F.col("as_of_date") == F.lit(AS_OF))
           .where(F.col("first_order_date").between(F.lit(start), F.lit(end))).count())
    assert week["orders"] > 0
    for language in LANGUAGES:
        m, fmt = Messages(language), Formats(language, "JPY")
        report = reports[("weekly", language)]
        pdf_text = _squash(report["pdf_text"])
        assert _squash(m("weekly.title")) in pdf_text
        for key in ("wk.kpis", "wk.channel.table", "wk.segments", "wk.dormant"):
            assert _squash(m(key)) in pdf_text, (language, key)
        row = re.search(rf"<td class=\"label\">{re.escape(m('wk.orders'))}</td><td class=\"num\">([^<]*)</td>",
                        report["html"])
        assert row and row.group(1) == fmt.count(week["orders"], people=False)
        assert fmt.money(week["net"]) in report["html"]
        new_row = re.search(rf"<td class=\"label\">{re.escape(m('wk.new'))}</td><td class=\"num\">([^<]*)</td>",
                            report["html"])
        assert new_row and new_row.group(1) == fmt.count(new)
    pages = len(__import__("pypdf").PdfReader(str(reports[("weekly", "ja")]["pdf"])).pages)
    assert pages <= 2, f"the weekly report should fit on two pages, has {pages}"


def rasterise(pdf: Path, prefix: Path) -> list[Path]:
    """PDF pages -> PNG files: poppler's pdftoppm where installed (Debian poppler-utils), otherwise
    PDFium through the pypdfium2 wheel (dev extra), so the check runs on a fresh machine too."""
    if shutil.which("pdftoppm"):
        subprocess.run(["pdftoppm", "-r", "40", "-png", str(pdf), str(prefix)], check=True)
        return sorted(prefix.parent.glob(f"{prefix.name}-*.png"))
    import pypdfium2

    pages = []
    document = pypdfium2.PdfDocument(str(pdf))
    for i in range(len(document)):
        path = prefix.parent / f"{prefix.name}-{i + 1:02d}.png"
        document[i].render(scale=40 / 72).to_pil().save(path)
        pages.append(path)
    document.close()
    return pages


def test_pdf_pages_are_not_blank(reports, tmp_path):
    from PIL import Image

    for (kind, language), report in reports.items():
        pages = rasterise(report["pdf"], tmp_path / f"{kind}_{language}")
        assert pages, (kind, language)
        for page in pages:
            pixels = np.asarray(Image.open(page).convert("L"), dtype=float)
            body = pixels[int(0.04 * len(pixels)):int(0.92 * len(pixels))]   # without the footer line
            ink = (body < 200).mean()
            assert body.std() > 3 and ink > 0.003, f"{page.name} looks blank (std {body.std():.1f}, ink {ink:.4f})"


def test_cli_writes_the_weekly_report(engine, capsys, tmp_path):
    from jobs.cli import main

    conf = tmp_path / "conf.yaml"
    from core.config import dump_config
    dump_config(engine["config"], conf)
    out = tmp_path / "out"
    assert main(["report", "--conf", str(conf), "--as-of", AS_OF.isoformat(), "--weekly", "--language", "en",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for suffix in ("html", "pdf"):
        path = out / f"weekly_{AS_OF.isoformat()}_en.{suffix}"
        assert path.is_file() and str(path) in printed
    assert main(["report", "--conf", str(conf), "--as-of", "2020-01-05"]) == 2   # no features that day
    assert "cvseg features --as-of 2020-01-05" in capsys.readouterr().err
