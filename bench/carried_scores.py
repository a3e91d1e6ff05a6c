"""What carrying the acquisition columns in customer_scores costs the score step and saves ltv_by_channel.

    python bench/carried_scores.py --warehouse COPY_OF_WORKDIR/run/warehouse [--date 2026-10-01] [--repeats 2]

Runs on a copy of the warehouse ``bench/pipeline.py --workdir WORKDIR`` leaves (it rewrites ``--date``'s
``customer_scores`` and ``ltv_by_channel`` partitions; features must exist for that date and a champion
must be registered). In one session, alternately, ``--repeats`` times each:

* the score step (``run_score`` with the champion, as ``cvseg score``) without the carried columns (the
  partition then reads them as null, as one written by an earlier release) and with them;
* the trends step's ``run_ltv_by_channel`` right after each: joined with ``customer_features`` (the
  partition without the columns) or from the scores alone.

Printed: seconds per run, the medians per way and their ratios, and whether ``ltv_by_channel`` came out
the same both ways (rows exact, amounts to 1e-9 relative). The first run of a session is a cold one
(Delta snapshots, Python workers, JIT): read the later ones.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import champion_session, use_engine_imports, warehouse_arguments  # noqa: E402

use_engine_imports()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", required=True, help="a copy of WORKDIR/run/warehouse of a bench/pipeline.py run")
    warehouse_arguments(parser, default_repeats=2)
    args = parser.parse_args(argv)
    import numpy as np
    from pyspark.sql import functions as F

    import pipelines.ltv as ltv
    from core.tables import LTV_BY_CHANNEL
    from pipelines.value_totals import run_ltv_by_channel

    config, bundle, version, spark, storage = champion_session(args)
    score_customers = ltv.score_customers
    seconds: dict[str, list[float]] = {f"{part} {way}": [] for part in ("score", "ltv_by_channel")
                                       for way in ("without", "with")}
    rows: dict[str, object] = {}
    for repeat in range(args.repeats):
        for way in ("without", "with"):
            # without: nothing carried (scores_table_rows then writes the columns null)
            ltv.score_customers = (score_customers if way == "with" else
                                   lambda features_df, bundle, carry=(): score_customers(features_df, bundle))
            started = time.perf_counter()
            ltv.run_score(storage, args.date, bundle, version, intervals=config.models.intervals)
            seconds[f"score {way}"].append(time.perf_counter() - started)
            started = time.perf_counter()
            result = run_ltv_by_channel(storage, args.date)
            seconds[f"ltv_by_channel {way}"].append(time.perf_counter() - started)
            print(f"  run {repeat + 1} {way:7s} carried columns: score {seconds[f'score {way}'][-1]:5.1f} s, "
                  f"ltv_by_channel {seconds[f'ltv_by_channel {way}'][-1]:5.1f} s ({result.summary_line()})",
                  flush=True)
            rows[way] = (storage.read(LTV_BY_CHANNEL).where(F.col("as_of_date") == F.lit(args.date)).toPandas()
                         .sort_values(["acquisition_channel", "acquisition_month"]).reset_index(drop=True))
    ltv.score_customers = score_customers
    a, b = rows["without"], rows["with"]
    same = len(a) == len(b)
    for column in (a.columns if same else ()):
        if a[column].dtype.kind == "f":
            same &= bool(np.allclose(a[column].to_numpy(float), b[column].to_numpy(float), rtol=1e-9, atol=0,
                                     equal_nan=True))
        elif column != "predicted_net_value_param_loadings":
            same &= bool((a[column].astype(str) == b[column].astype(str)).all())
        else:
            same &= all(np.allclose(x, y, rtol=1e-9, atol=0) for x, y in zip(a[column], b[column]))
    median = {key: statistics.median(values) for key, values in seconds.items()}
    both = {way: median[f"score {way}"] + median[f"ltv_by_channel {way}"] for way in ("without", "with")}
    print(f"\nat {args.date} (medians of {args.repeats}): score {median['score without']:.1f} s without the carried "
          f"columns, {median['score with']:.1f} s with ({median['score with'] / median['score without']:.2f}x); "
          f"ltv_by_channel joined {median['ltv_by_channel without']:.1f} s, from the scores "
          f"{median['ltv_by_channel with']:.1f} s ({median['ltv_by_channel with'] / median['ltv_by_channel without']:.2f}x); "
          f"both {both['without']:.1f} s -> {both['with']:.1f} s; ltv_by_channel {'equal' if same else 'DIFFERENT'} "
          "both ways")
    print(json.dumps({"date": args.date.isoformat(), "seconds": seconds, "median": median, "tables_equal": same}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
