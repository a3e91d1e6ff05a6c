"""MLflow through a few small helpers: experiment setup, logging a fit or a backtest, the registry.

Local default: ``sqlite:///<warehouse>/mlflow.db`` with artifacts under ``<warehouse>/mlflow-artifacts``
(MLflow 3 deprecates the file store). On Databricks the workspace tracking server (``databricks``).
Each registered model version is a :class:`models.bundle.ScoringBundle` logged as a pyfunc; the
best by the configured metric carries the alias ``champion``; older versions stay.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from core.config import Config, ConfigError, S3Conf
from core.s3 import as_boto_uri, is_s3, set_mlflow_environment

log = logging.getLogger(__name__)

CHAMPION = "champion"


@dataclass(frozen=True)
class TrackingTarget:
    uri: str
    experiment: str
    registered_model: str
    artifact_root: str | None
    s3: S3Conf | None = None      # set when artifacts go to S3: MLflow's boto3 client needs the endpoint


def tracking_target(config: Config) -> TrackingTarget:
    """Where runs, models and the registry go. A warehouse on S3 needs ``tracking.uri`` (a sqlite
    file cannot live on S3, and one on a cluster driver's disk would take the registry, with
    its champion, down with the cluster); its artifacts default to ``<warehouse>/mlflow-artifacts``."""
    client = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in config.client)
    on_databricks = config.env == "databricks"
    uri = config.tracking.uri or ("databricks" if on_databricks else None)
    warehouse = config.storage.warehouse
    remote = "://" in warehouse and not warehouse.startswith("file:")
    folder = None if remote else Path(warehouse.removeprefix("file://")).resolve()
    artifact_root = config.tracking.artifact_location
    if uri is None:
        if remote:
            raise ConfigError(
                f"tracking.uri: the warehouse {warehouse} is not a local folder, so the MLflow tracking store "
                "cannot default to sqlite:///<warehouse>/mlflow.db; set tracking.uri to an MLflow server "
                "(http://...), databricks, or a sqlite file on a disk that outlives the cluster "
                "(sqlite:////mnt/shared/mlflow.db): the registry holds the champion the next night scores with")
        folder.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        artifact_root = artifact_root or (folder / "mlflow-artifacts").as_uri()
    elif artifact_root is None and is_s3(warehouse) and not on_databricks:
        artifact_root = f"{warehouse.rstrip('/')}/mlflow-artifacts"
    elif artifact_root is None and folder is not None and uri.startswith(("sqlite:", "file:")):
        # a local store named explicitly: the artifacts still go beside the warehouse, not to
        # MLflow's default ./mlruns of whatever folder the command runs in (a tracking server,
        # http://..., keeps its own artifact store)
        artifact_root = (folder / "mlflow-artifacts").as_uri()
    if artifact_root is not None:
        artifact_root = as_boto_uri(artifact_root)   # MLflow's S3 store knows s3:// only
    experiment = config.tracking.experiment or (f"/Shared/cvseg/{client}" if on_databricks else f"cvseg-{client}")
    return TrackingTarget(uri=uri, experiment=experiment,
                          registered_model=config.tracking.registered_model or f"cvseg_{client}_ltv",
                          artifact_root=artifact_root,
                          s3=config.storage.s3 if is_s3(artifact_root) else None)


def start(target: TrackingTarget) -> str:
    """Point MLflow at the target and make sure the experiment exists; returns its id. An
    experiment keeps the artifact location it was created with: a changed
    tracking.artifact_location applies to new experiments only (a warning says so)."""
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if target.s3 is not None:
        set_mlflow_environment(target.s3)
    mlflow.set_tracking_uri(target.uri)
    mlflow.set_registry_uri(target.uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(target.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(target.experiment, artifact_location=target.artifact_root)
    else:
        experiment_id = experiment.experiment_id
        if target.artifact_root and experiment.artifact_location.rstrip("/") != target.artifact_root.rstrip("/") \
                and not experiment.artifact_location.startswith(target.artifact_root.rstrip("/") + "/"):
            log.warning("MLflow experiment %s keeps its artifacts at %s (set when it was created), not at %s; "
                        "use a new tracking.experiment to move them", target.experiment,
                        experiment.artifact_location, target.artifact_root)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


#: The pyfunc's code, logged as a model from code (no pickled Python object in the registry).
PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")


def _signature(bundle) -> Any:
    from mlflow.models import infer_signature

    if hasattr(bundle, "input_example"):       # the hybrid reads more feature columns (models/hybrid.py)
        example = bundle.input_example()
        return infer_signature(example, bundle.predict(example)), example
    # counts as float64: a served batch may carry missing values, which integer columns cannot hold
    example = pd.DataFrame([{"customer_id": "C1", "frequency": 2.0, "recency": 30.0, "T": 60.0,
                             "monetary_value": 5000.0, "n_orders": 3.0, "n_cancelled": 0.0, "net_6m": 12000.0,
                             "acquisition_channel": "web", "net_frequency": 2.0, "net_recency": 30.0,
                             "net_T": 60.0, "net_monetary_value": 5000.0}])[list(bundle.feature_columns)]
    return infer_signature(example, bundle.predict(example)), example


def _pip_requirements() -> list[str]:
    """Pinned versions of what a bundle needs to load; given explicitly because MLflow's own inference
    loads the model in a subprocess (measured 4-10 s per logged model here, 0.3 s without).
    The ``cvseg`` package itself (``models/``) must be installed where the model is served."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("numpy", "pandas", "scipy", "lifetimes", "mlflow", "scikit-learn"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_run(run_name: str, params: dict[str, Any], metrics: dict[str, float],
            artifacts: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
            nested: bool = False) -> str:
    """One run without a model: params, metrics, artifacts (CSV/PNG/JSON). Returns the run id."""
    import mlflow

    with mlflow.start_run(run_name=run_name, nested=nested) as run, tempfile.TemporaryDirectory() as tmp:
        _log_contents(params, metrics, artifacts, tags, Path(tmp))
        return run.info.run_id


def _log_contents(params, metrics, artifacts, tags, folder: Path) -> None:
    import mlflow

    mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict, tuple)) else v)
                       for k, v in params.items()})
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and pd.notna(v)})
    if tags:
        mlflow.set_tags(tags)
    for name, value in (artifacts or {}).items():
        _log_artifact(value, name, folder)


def log_bundle(bundle, run_name: str, params: dict[str, Any], metrics: dict[str, float],
               artifacts: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
               register_as: str | None = None, nested: bool = False) -> tuple[str, str | None]:
    """One run: params, metrics, artifacts (tables as CSV, figures as PNG, dicts as JSON) and the bundle
    as a pyfunc model (registered under ``register_as`` when given). Returns (run_id, version).
    ``nested=True`` inside an active parent run (a backtest)."""
    import mlflow

    with mlflow.start_run(run_name=run_name, nested=nested) as run, tempfile.TemporaryDirectory() as tmp:
        _log_contents(params, metrics, artifacts, tags, Path(tmp))
        folder = bundle.save(Path(tmp) / "bundle")
        signature, example = _signature(bundle)
        info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE),
                                       artifacts={"bundle": str(folder)}, signature=signature,
                                       input_example=example,
                                       registered_model_name=register_as,
                                       pip_requirements=_pip_requirements(),
                                       code_paths=None)
        version = getattr(info, "registered_model_version", None)
        return run.info.run_id, (str(version) if version is not None else None)


def log_fit(bundle, config: Config, as_of, features_version: Any, seconds: dict[str, float], run_name: str,
            extra_params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
            register_as: str | None = None) -> tuple[str, str | None]:
    """The run of one fitted bundle (``cvseg fit`` and a nightly refit log the same fields): the model,
    basis, time unit, penalizer, horizon, the customer_features version it read, the purchase fit's
    log-likelihood and the fit's seconds. Returns (run_id, version)."""
    params = {"purchase_model": bundle.purchase.name, "value_model": bundle.value_model,
              "as_of": as_of.isoformat(), "purchase_basis": bundle.purchase_basis,
              "time_unit": config.features.time_unit, "penalizer_coef": config.models.penalizer_coef,
              "horizon_months": config.models.horizon_months,
              "customer_features_version": features_version, **(extra_params or {})}
    metrics = {"log_likelihood": bundle.purchase.fit_info_.get("log_likelihood"),
               **{f"fit_seconds_{k}": v for k, v in seconds.items()}}
    return log_bundle(bundle, run_name=run_name, params=params, metrics=metrics,
                      artifacts={"parameters": bundle.describe()}, tags={"kind": "fit", **(tags or {})},
                      register_as=register_as)


@contextmanager
def parent_run(run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[str]:
    """An outer run (e.g. one backtest) that nested runs attach to; yields its run id."""
    import mlflow

    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict, tuple)) else v)
                           for k, v in params.items()})
        if tags:
            mlflow.set_tags(tags)
        yield run.info.run_id


def log_parent_metrics(metrics: dict[str, float], artifacts: dict[str, Any] | None = None) -> None:
    """Metrics and artifacts on the active (parent) run."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and pd.notna(v)})
    with tempfile.TemporaryDirectory() as tmp:
        for name, value in (artifacts or {}).items():
            _log_artifact(value, name, Path(tmp))


@dataclass(frozen=True)
class BacktestFit:
    """One model fitted at one backtest origin, as MLflow records it (a nested run of the backtest).
    ``register``: log the bundle as a registered model version (the newest origin's fits)."""
    origin: dt.date
    name: str
    bundle: Any
    params: dict[str, Any]
    metrics: dict[str, float]
    artifacts: dict[str, Any]
    tags: dict[str, str]
    register: bool


@dataclass(frozen=True)
class BacktestRuns:
    """What :func:`log_backtest` created: the parent run, each fit's run and the registered versions."""
    parent_run_id: str
    run_ids: dict[tuple[dt.date, str], str]
    versions: dict[str, str | None]
    champion_version: str | None


def log_backtest(registered_model: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
                 fits: Iterable[BacktestFit], champion: str, summary_metrics: dict[str, float],
                 summary_artifacts: dict[str, Any]) -> BacktestRuns:
    """A backtest as one parent run: every fit nested under it (``fits`` is consumed lazily, so each
    fit's figures are built as it is logged), the newest origin's bundles registered, the champion's
    version given the ``champion`` alias, and the summary metrics and artifacts on the parent (the
    ``champion`` artifact gains the registered ``version``)."""
    run_ids: dict[tuple[dt.date, str], str] = {}
    versions: dict[str, str | None] = {}
    with parent_run(run_name, params, tags=tags) as parent_run_id:
        for fit in fits:
            run_name_fit = f"{fit.name}-{fit.origin.isoformat()}"
            if fit.register:
                run_ids[(fit.origin, fit.name)], versions[fit.name] = log_bundle(
                    fit.bundle, run_name_fit, fit.params, fit.metrics, fit.artifacts, fit.tags,
                    register_as=registered_model, nested=True)
            else:
                run_ids[(fit.origin, fit.name)] = log_run(run_name_fit, fit.params, fit.metrics, fit.artifacts,
                                                          fit.tags, nested=True)
        champion_version = versions.get(champion)
        if champion_version:
            set_champion(registered_model, champion_version)
        artifacts = dict(summary_artifacts)
        if "champion" in artifacts:
            artifacts["champion"] = {**artifacts["champion"], "version": champion_version}
        log_parent_metrics(summary_metrics, artifacts=artifacts)
    return BacktestRuns(parent_run_id, run_ids, versions, champion_version)


def _log_artifact(value: Any, name: str, folder: Path) -> None:
    import mlflow

    if isinstance(value, pd.DataFrame):
        path = folder / f"{name}.csv"
        value.to_csv(path, index=False)
        mlflow.log_artifact(str(path))
    elif hasattr(value, "savefig"):
        path = folder / f"{name}.png"
        value.savefig(path, dpi=110, bbox_inches="tight")
        mlflow.log_artifact(str(path))
    else:
        path = folder / f"{name}.json"
        path.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
        mlflow.log_artifact(str(path))


@dataclass(frozen=True)
class ChampionInfo:
    """What the nightly run needs to know about the registered champion, from its run's params."""

    version: str
    fitted_as_of: dt.date | None      # as-of date of the features it was fitted on
    registered_at: dt.datetime        # UTC
    purchase_basis: str = "gross"     # the basis it was fitted on (runs before the basis existed: gross)
    value_model: str = "btyd"         # a "hybrid" champion is refitted as a hybrid (pipelines/hybrid.py)
    by_channel: bool = False          # a channel-aware champion (models/channels.py) is refitted as such
    purchase_model: str | None = None  # the BTYD purchase model it was fitted with (bgnbd, mbgnbd, ...)


def champion_info(registered_model: str) -> ChampionInfo | None:
    """The champion's version and the params of the run that logged it (:func:`log_fit` writes them);
    None before any champion."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(registered_model, CHAMPION)
    except MlflowException:
        return None
    fitted = None
    basis = "gross"
    value_model = "btyd"
    by_channel = False
    purchase_model = None
    if version.run_id:
        params = client.get_run(version.run_id).data.params
        as_of = params.get("as_of")
        fitted = dt.date.fromisoformat(as_of) if as_of else None
        basis = params.get("purchase_basis", "gross")
        value_model = params.get("value_model", "btyd")
        by_channel = params.get("by_channel", "false").lower() == "true"     # MLflow keeps params as text
        purchase_model = params.get("purchase_model")
    registered = dt.datetime.fromtimestamp(version.creation_timestamp / 1000, tz=dt.timezone.utc)
    return ChampionInfo(version=str(version.version), fitted_as_of=fitted, registered_at=registered,
                        purchase_basis=basis, value_model=value_model, by_channel=by_channel,
                        purchase_model=purchase_model)


def set_champion(registered_model: str, version: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(registered_model, CHAMPION, version)


def champion_version(registered_model: str) -> str | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(registered_model, CHAMPION).version)
    except MlflowException:
        return None


def download_champion(registered_model: str) -> tuple[Path, str]:
    """The champion's bundle folder (downloaded) and its version; a clear error if there is none yet.
    :func:`pipelines.ltv.load_champion` turns the folder into a bundle (core stays below models)."""
    import mlflow

    version = champion_version(registered_model)
    if version is None:
        raise LookupError(f"no champion model registered as {registered_model!r} yet; run `cvseg backtest` "
                          "(or `cvseg fit --register`) first")
    local = mlflow.artifacts.download_artifacts(f"models:/{registered_model}@{CHAMPION}")
    # the top bundle.json (a hybrid's folder holds its BTYD bundle's in btyd/)
    return min(Path(local).rglob("bundle.json"), key=lambda p: len(p.parts)).parent, version


def list_versions(registered_model: str) -> pd.DataFrame:
    """Every registered version with its aliases, run and creation time (newest first)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{registered_model}'")
    except MlflowException:
        versions = []
    rows = []
    for v in versions:
        v = client.get_model_version(registered_model, v.version)  # search results omit aliases
        run = client.get_run(v.run_id) if v.run_id else None
        rows.append({
            "version": int(v.version), "aliases": ",".join(getattr(v, "aliases", []) or []),
            "value_model": (run.data.params.get("value_model") if run else None),
            "purchase_model": (run.data.params.get("purchase_model") if run else None),
            "as_of": (run.data.params.get("as_of") if run else None),
            "created": pd.Timestamp(v.creation_timestamp, unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M"),
            "run_id": v.run_id,
        })
    frame = pd.DataFrame(rows, columns=["version", "aliases", "value_model", "purchase_model", "as_of",
                                        "created", "run_id"])
    return frame.sort_values("version", ascending=False).reset_index(drop=True)


os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
