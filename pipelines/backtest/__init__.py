"""BACKTEST stage: fit every model as of a past cutoff, predict the next horizon, compare with what happened.

For each *origin* ``O`` (the as-of date ``D``, then ``D`` minus ``spacing_months``, ... ``n_origins``
origins) the cutoff is ``C = O - horizon_months``:

* ``calibration_holdout`` at ``C`` (features as of ``C`` + each customer's actual orders in
  ``(C, O]``) is reused when that partition exists with the same horizon and time unit, else built;
* every configured purchase model (``models.purchase_models``) is fitted with Gamma-Gamma spend and
  the cancellation model on sufficient statistics of the features at ``C`` only
  (:func:`pipelines.ltv.fit_btyd_bundles`);
* the **six-month cohort method**: customers of ``calibration_holdout`` at ``C - H`` are put in
  cells in Spark (:func:`with_cohort_cells`), and each cell's customer count, sum and sum of squares of
  actual net revenue in ``(C - H, C]`` come to the driver as one small aggregate (one row per cell);
  :class:`models.cohort.CohortModel` backs sparse cells off to coarser ones. A customer's prediction
  is the mean of their cell at ``C``;
* **purchase basis** (``models.purchase_basis``): with ``auto`` (default) every purchase model is
  fitted twice, on gross orders (``bgnbd``: cancelled orders count as purchases) and on completed
  orders only (``bgnbd_net``); the champion metric then picks model and basis together, so the
  basis is chosen by this client's data. ``gross`` / ``net`` fit one basis only;
* **channel-aware** variants (``models.by_channel.enabled``): BG/NBD and MBG/NBD with per-channel
  parameters shrunk towards the pooled fit (:mod:`models.channels`), named ``bgnbd_channel`` /
  ``bgnbd_channel_net``, compete beside the pooled models; the champion metric decides;
* the **naive** baseline: the customer's own net revenue in the trailing six months;
* every model predicts every customer in one ``mapInPandas`` pass with the bundles broadcast
  (:func:`predict_all`), giving long rows (model, customer_id, predicted, actual).

**MLflow.** One parent run per backtest; one nested run per (origin, model) with params, metrics and
artifacts (calibration plot, decile table, parameter table). The bundles fitted at the newest origin --
exactly the models whose metrics were just measured, fitted on data up to its cutoff -- are logged as
pyfunc models and registered (one new version per model per backtest); the model with the best mean
``models.champion_metric`` over the origins gets the alias ``champion`` (the previous champion stays an
older version). A cohort or naive champion scores with its own method (the bundle carries the cells).

Metrics are computed in Spark per model; only one row per model (and ten decile rows per model)
reach the driver. The definitions are those of :mod:`models.metrics` (tested against it):

* ``mae``, ``rmse``, ``total_error_pct`` (positive = over-prediction), ``abs_total_error_pct``;
* ``spearman``: Pearson correlation of average ranks (ties share their average rank);
* ``normalized_gini``: area between the capture curve and the diagonal, divided by the same area when
  customers are ordered by their actual value;
* ``top_decile_capture`` / ``top20_capture``: share of the actual total brought by the predicted
  top 10% / 20% of customers;
* decile table: customers in ten groups by prediction (decile 1 = highest), mean predicted vs actual;
* ``interval_coverage``: share of customers whose actual value lies in their 80% interval predicted at
  the cutoff (P10..P90, :mod:`models.intervals`), a realised 0 counted by the randomised probability
  integral transform (the share of the predicted atom at 0 within the levels 0.1..0.9: under a
  calibrated model 80% whatever the atom); ``interval_closed_coverage``: the plain share with
  P10 <= actual <= P90 (over-covers where P(value = 0) > 10%). Null for cohort and naive values.

**Ties and ranks in Spark.** Customers with the same predicted value form a tie group that is never
split. Rows are first grouped by (model, value) -- one row per tie group, with its customer count and
actual sum -- and a running sum over the groups of each model, ordered by value, gives the number of
customers above each group (``Window.partitionBy(model)``, frame: unbounded preceding to current row).
From it: the average rank ``C + (W + 1) / 2`` (spearman, joined back to the customers), the capture
curve corners (gini, top-share capture, with linear interpolation inside a tie group) and the decile
``ceil(10 k / N)`` of a group with average rank ``k`` (integer arithmetic, exact). The window holds
one row per *distinct* value of a model in one task: bounded by the distinct predictions (many
customers share values: zeros of the naive model, cohort cell means), not by a global sort.

Package layout: :mod:`.schema` (shared columns, the error), :mod:`.transforms` (origins, cohort cells,
predictions), :mod:`.metrics` (the metrics in Spark), :mod:`.fits` (the models of one cutoff),
:mod:`.runner` (the stage runner and its MLflow records).
"""
from pipelines.backtest.fits import OriginModels, fit_origin_models
from pipelines.backtest.metrics import compute_metrics
from pipelines.backtest.runner import (BacktestResult, choose_champion, compare_bases, ensure_calibration,
                                       lacks_net_basis, run_backtest, run_origin)
from pipelines.backtest.schema import PREDICTION_SCHEMA, BacktestError
from pipelines.backtest.transforms import backtest_origins, cohort_cell_stats, predict_all, with_cohort_cells

__all__ = ["run_backtest", "run_origin", "BacktestResult", "BacktestError", "ensure_calibration", "lacks_net_basis",
           "choose_champion", "compare_bases", "fit_origin_models", "OriginModels", "compute_metrics", "predict_all",
           "with_cohort_cells", "cohort_cell_stats", "backtest_origins", "PREDICTION_SCHEMA"]
