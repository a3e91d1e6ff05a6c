"""The engine as a Python API, for data scientists in a notebook (Databricks) or a script (a laptop).

    import cvseg

    engine = cvseg.Engine.local("/tmp/cvseg", conf=cvseg.sample_conf("cdnow"))   # or Engine(spark, config)
    engine.ingest(cvseg.cdnow_sample_path())
    engine.features("1998-06-30")
    result = engine.backtest("1998-06-30")          # every configured model, the champion registered
    result.metrics                                  # one row per model: MAE, Spearman, top-20% capture ...
    engine.table("customer_scores", as_of="1998-06-30")   # a Spark DataFrame

Each method runs one stage runner (``pipelines/``) and returns its typed result
(:mod:`core.results`: ``summary_line()``, ``asdict()``); tables come back as Spark DataFrames.
Dates may be ``datetime.date`` or ``"YYYY-MM-DD"``: this is an edge, where dates are parsed.
"""
from cvseg.api import Engine, cdnow_sample_path, load_config, sample_conf
from cvseg.baselines import plain_lifetimes_value

__all__ = ["Engine", "load_config", "sample_conf", "cdnow_sample_path", "plain_lifetimes_value"]
