"""Layered, typed configuration.

Layers, later wins: the packaged ``conf/base.yaml`` -> the environment file named by ``env``
(``conf/local.yaml``, ``conf/databricks.yaml``, ``conf/emr.yaml``) -> the user's ``--conf`` file
-> ``--set dotted.key=value`` overrides. The result is parsed once into frozen pydantic objects;
unknown keys and wrong types are rejected with the dotted key path in the message.
"""
from __future__ import annotations

import copy
import logging
import re
from datetime import date
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import UserError

log = logging.getLogger(__name__)

ENVIRONMENTS = ("local", "databricks", "emr")


class ConfigError(UserError, ValueError):
    """The configuration cannot be used; the message names the key and what to change."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparkConf(_Frozen):
    master: str | None = None
    app_name: str = "cvseg"
    shuffle_partitions: int | None = Field(default=None, ge=1)
    driver_memory: str = "4g"
    # a night on a warehouse with fewer customers (the last features run) evaluates Spark's
    # expressions interpreted, without compiling generated code (core.spark.expressions_sized_for); 0: never
    interpreted_below_customers: int = Field(default=50_000, ge=0)
    extra: dict[str, str] = Field(default_factory=dict)


class S3Conf(_Frozen):
    """How every S3 client of the engine (Spark's s3a, boto3 for the export, MLflow's artifact
    store) reaches the bucket. Credentials are never here: they come from the standard chains
    (AWS_* environment variables, the instance profile / default provider chain)."""

    endpoint_url: str | None = None       # S3-compatible endpoint (MinIO, moto in tests); None: AWS
    path_style_access: bool = False       # http://host/bucket/key instead of http://bucket.host/key
    region: str | None = None             # None: the SDK's own (AWS_REGION, profile, instance metadata)
    # every request: the SDK's attempts, the first included (s3a fs.s3a.attempts.maximum = this - 1,
    # boto3 retries.total_max_attempts)
    max_attempts: int = Field(default=10, ge=1)
    # s3a on top of the SDK: an operation that still failed is retried this often with
    # exponential backoff from retry_interval_ms (throttling: throttle_retry_limit times)
    retry_limit: int = Field(default=10, ge=0)
    retry_interval_ms: int = Field(default=500, ge=1)
    throttle_retry_limit: int = Field(default=20, ge=0)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+/?$", value):
            raise ValueError(f"{value!r} is not an endpoint URL such as http://127.0.0.1:9000 or "
                             "https://s3.eu-west-1.amazonaws.com (scheme and host only)")
        if value is not None and "@" in value:
            raise ValueError("the endpoint URL must not hold credentials; they come from the environment "
                             "or the instance profile")
        return value


class StorageConf(_Frozen):
    warehouse: str = "./warehouse"
    backend: Literal["auto", "delta-spark", "deltalake"] = "auto"
    retention_hours: int = Field(default=168, ge=0)   # VACUUM: time travel reaches back this far
    # "<catalog>.<schema>" (Unity Catalog) or "<schema>" (Hive metastore / Glue): every table is
    # also registered there as an external Delta table at its warehouse path
    catalog: str | None = None
    # the run lock (core/run_lock.py): a holder whose heartbeat is older than this is taken over
    lock_stale_minutes: int = Field(default=30, ge=1)
    s3: S3Conf = S3Conf()

    @field_validator("catalog")
    @classmethod
    def _catalog_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", value):
            raise ValueError(f"{value!r} is not <catalog>.<schema> or <schema> (letters, digits, underscores)")
        return value


class BusinessConf(_Frozen):
    timezone: str = "Asia/Tokyo"
    currency: str = "JPY"


class CsvConf(_Frozen):
    header: bool = True
    delimiter: str = ","                 # "whitespace": runs of spaces/tabs (fixed-width exports)
    encoding: str = "utf-8"
    quote: str = '"'
    escape: str = '"'                    # inside quotes: '"' = RFC 4180 doubled quotes ("a""b"); "\\" = backslash
    column_names: tuple[str, ...] = ()   # names for files without a header row


class ColumnMapping(_Frozen):
    """Canonical order field -> column name in the client's export (None: not in the export)."""

    order_id: str | None = None          # None: derived from source file name and row number
    customer_id: str
    order_ts: str
    gross_amount: str | None = None
    status: str | None = None
    cancelled_amount: str | None = None
    channel: str | None = None
    category: str | None = None
    currency: str | None = None
    quantity: str | None = None
    unit_price: str | None = None
    # matching keys for identity.match_on: read at ingest, normalised and HMAC-hashed at once;
    # never stored, logged or quarantined in clear
    email: str | None = None
    phone: str | None = None


class CancellationConf(_Frozen):
    style: Literal["none", "status", "negative_lines"] = "none"
    cancelled_values: tuple[str, ...] = ()
    # status values known to be live orders: any other value not in cancelled_values and never
    # seen by an earlier ingest is reported (validation.unknown_status)
    live_values: tuple[str, ...] = ()
    order_id_prefix: str | None = None
    strip_prefix_to_match: bool = True


SOURCE_NAME = r"[a-z][a-z0-9_]{0,31}"


class SourceConf(_Frozen):
    # a short name (ec, store): kept on every order (`orders.source_name`); with several sources
    # it also namespaces order ids and customer ids (`<name>:<id>`), which collide across systems
    name: str = "default"
    path: str | None = None
    format: Literal["csv", "parquet", "delta"] = "csv"
    csv: CsvConf = CsvConf()
    grain: Literal["order", "line"] = "order"
    columns: ColumnMapping
    timestamp_format: str = "yyyy-MM-dd HH:mm:ss"
    timestamp_formats_extra: tuple[str, ...] = ()
    source_timezone: str = "Asia/Tokyo"
    cancellation: CancellationConf = CancellationConf()
    extra_columns: Literal["drop", "keep"] = "drop"
    allowed_currencies: tuple[str, ...] = ()
    new_files_only: bool = True
    # the channel of every order of this source when it has no channel column (a store POS export)
    channel: str | None = None

    @field_validator("name")
    @classmethod
    def _source_name(cls, value: str) -> str:
        if not re.fullmatch(SOURCE_NAME, value):
            raise ValueError(f"{value!r} is not a source name: lower-case letters, digits and underscores, "
                             "starting with a letter, at most 32 characters (e.g. ec, store)")
        return value

    @model_validator(mode="after")
    def _channel_once(self) -> "SourceConf":
        if self.channel is not None and self.columns.channel is not None:
            raise ValueError("set either channel (one channel for the whole source) or columns.channel, not both")
        return self

    @model_validator(mode="after")
    def _mapping_can_work(self) -> "SourceConf":
        """Mapping combinations that cannot work, refused when the config is read (not at ingest)."""
        cols, cancellation = self.columns, self.cancellation
        if cols.gross_amount is None and not (cols.quantity and cols.unit_price):
            raise ValueError("map columns.gross_amount, or both columns.quantity and columns.unit_price "
                             "(gross = quantity x unit_price)")
        if self.grain == "line" and cols.order_id is None:
            raise ValueError("grain: line needs columns.order_id (lines are summed per order)")
        if cancellation.style == "status" and (cols.status is None or not cancellation.cancelled_values):
            raise ValueError("cancellation.style: status needs columns.status and cancellation.cancelled_values "
                             "(e.g. [キャンセル])")
        if cancellation.style == "negative_lines" and cancellation.order_id_prefix and cols.order_id is None:
            raise ValueError("cancellation.order_id_prefix needs columns.order_id")
        if self.allowed_currencies and cols.currency is None:
            raise ValueError("allowed_currencies is set but columns.currency is not mapped")
        for fmt in (self.timestamp_format, *self.timestamp_formats_extra):
            if "%" in fmt:
                raise ValueError(f"timestamp_format {fmt!r}: use Spark datetime patterns such as "
                                 "yyyy/MM/dd HH:mm:ss, not strftime codes")
        return self


class IdentityConf(_Frozen):
    """One customer across several sources (pipelines/identity.py): an explicit map and/or
    deterministic matching on normalised, HMAC-hashed keys."""

    # the client's own joins (source_name, source_customer_id, customer_id): a CSV file or folder
    # (UTF-8, with that header), a parquet or Delta path, or a table name (metastore / Unity Catalog)
    map: str | None = None
    map_format: Literal["csv", "parquet", "delta", "table"] = "csv"
    match_on: tuple[Literal["email", "phone"], ...] = ()
    # a phone number written without its country prefix (090-1234-5678) is read in this country
    phone_country_code: str = "81"
    # a key shared by more source ids than this (a shop's phone, a placeholder e-mail) links nobody
    # and is reported in identity_conflicts
    max_ids_per_key: int = Field(default=5, ge=2)
    max_iterations: int = Field(default=30, ge=1)   # label propagation rounds before giving up

    @field_validator("phone_country_code", mode="before")
    @classmethod
    def _country(cls, value: Any) -> str:
        value = str(value) if isinstance(value, int) else value   # YAML reads 81 as a number
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a country calling code (e.g. \"81\")")
        if not re.fullmatch(r"[1-9][0-9]{0,2}", value):
            raise ValueError(f"{value!r} is not a country calling code (digits without +, e.g. 81, 1, 44)")
        return value

    @property
    def is_configured(self) -> bool:
        return bool(self.map or self.match_on)


class ValidationConf(_Frozen):
    max_rejected_share: float = Field(default=0.05, ge=0.0, le=1.0)
    future_tolerance_days: int = Field(default=0, ge=0)
    # "future" is judged against the day a file is read (in business.timezone), never against the
    # as-of date of an analysis; a fixed day here instead (an export made on a known day, tests)
    future_cutoff: date | None = None
    # a status value in neither cancelled_values nor live_values, never seen before: warn | error
    unknown_status: Literal["warn", "error"] = "warn"


class FeaturesConf(_Frozen):
    time_unit: Literal["days", "weeks"] = "days"
    # the customer_features table's windows (core.tables.TRAILING_MONTHS); kept as a key so a
    # resolved config says which windows its features have
    trailing_months: tuple[int, ...] = (3, 6, 12)
    incremental: bool = True
    full_every_days: int = Field(default=7, ge=1)

    @field_validator("trailing_months")
    @classmethod
    def _the_tables_windows(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        from core.tables import TRAILING_MONTHS   # pyspark types: imported when a config names windows

        if not v or any(m <= 0 for m in v):
            raise ValueError("must be a non-empty list of positive month counts")
        months = tuple(sorted(set(v)))
        if months != TRAILING_MONTHS:
            raise ValueError(f"must be {list(TRAILING_MONTHS)}: the customer_features table has columns for "
                             f"these windows only (orders_<m>m, net_<m>m); another window means adding its "
                             f"columns in core/tables.py")
        return months


class HybridConf(_Frozen):
    """The hybrid value model (gradient-boosted trees on BTYD outputs and behavioural features,
    :mod:`models.hybrid`): a value model beside the cohort method and the naive baseline, so a
    switch of its own rather than an entry of ``purchase_models`` (which are BTYD purchase
    processes, each fitted with Gamma-Gamma)."""

    enabled: bool = True                  # compete in the backtest (two horizons of history needed)
    base_model: Literal["bgnbd", "paretonbd", "mbgnbd"] | None = None   # None: the first purchase model
    sample_rows: int = Field(default=200_000, ge=100)      # training rows collected to the driver, at most
    importance_rows: int = Field(default=50_000, ge=100)   # holdout rows for permutation importance, at most
    min_train_customers: int = Field(default=500, ge=1)    # fewer customers two horizons back: skipped
    loss: Literal["poisson", "squared_error", "gamma"] = "poisson"
    max_iter: int = Field(default=100, ge=1)
    learning_rate: float = Field(default=0.05, gt=0.0, le=1.0)
    max_leaf_nodes: int = Field(default=15, ge=2)
    min_samples_leaf: int = Field(default=100, ge=1)
    monotonic: bool = True                # known directions (recency, BTYD forecast, recent spend)
    seed: int = 0


class ByChannelConf(_Frozen):
    """Channel-aware BTYD variants (:mod:`models.channels`): per acquisition channel, BG/NBD or MBG/NBD and
    Gamma-Gamma parameters shrunk towards the pooled fit by a prior worth ``prior_customers`` customers.
    They compete in the backtest beside the pooled models (``bgnbd_channel``, ``bgnbd_channel_net``)."""

    enabled: bool = False
    # the prior's weight: a channel needs about this many customers before its own data dominate
    prior_customers: float = Field(default=1000.0, gt=0.0)
    # channels with fewer customers in a fit (repeat customers for Gamma-Gamma) keep the pooled parameters
    min_customers: int = Field(default=100, ge=1)


class ModelsConf(_Frozen):
    # the prediction horizon (customer_scores' value, the export's column) and the backtest's holdout
    horizon_months: int = Field(default=6, ge=1)
    purchase_models: tuple[Literal["bgnbd", "paretonbd", "mbgnbd"], ...] = ("bgnbd", "paretonbd", "mbgnbd")
    compare_cohort: bool = True
    compare_naive: bool = True
    penalizer_coef: float = Field(default=0.0, ge=0.0)
    cohort_min_cell_size: int = Field(default=30, ge=1)
    cohort_by_channel: bool = False
    # auto (Config.champion_metric) or one of models.metrics.METRIC_DIRECTION's keys
    # (tests/unit/test_config.py keeps them equal; core stays below models)
    champion_metric: Literal["auto", "mae", "rmse", "abs_total_error_pct", "spearman", "normalized_gini",
                             "top_decile_capture", "top20_capture"] = "auto"
    refit_every_days: int = Field(default=7, ge=1)
    champion_max_age_days: int | None = Field(default=None, ge=1)
    # Which orders the purchase and spend models see: gross (cancelled ones too), net (completed
    # only), auto (the backtest fits both and the champion metric picks, per client).
    purchase_basis: Literal["gross", "net", "auto"] = "auto"
    hybrid: HybridConf = HybridConf()
    by_channel: ByChannelConf = ByChannelConf()
    # P10 / P50 / P90 of each customer's 6-month net value in customer_scores (BG/NBD, MBG/NBD),
    # with the parameters' uncertainty from the fit's Fisher information; and their coverage in backtests
    intervals: bool = True

    @field_validator("purchase_models")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("list at least one purchase model")
        return tuple(dict.fromkeys(v))


class TrackingConf(_Frozen):
    # None: sqlite:///<warehouse>/mlflow.db for a local warehouse, "databricks" there; required
    # for an S3 warehouse (a sqlite file cannot live on S3)
    uri: str | None = None
    # where new experiments keep their artifacts (models); None: <warehouse>/mlflow-artifacts
    # (s3:// for an S3 warehouse), MLflow's own default on Databricks
    artifact_location: str | None = None
    experiment: str | None = None     # None: /Shared/cvseg/<client> on Databricks, cvseg-<client> elsewhere
    registered_model: str | None = None  # None: cvseg_<client>_ltv


class ExportConf(_Frozen):
    """The daily customer -> segment CSV (`cvseg export`, last step of `cvseg run`)."""

    dest: str = "./exports"               # local folder or s3://bucket/prefix/
    file_prefix: str = "customer_segments"
    staging_dir: str | None = None        # where Spark writes part files; None: a local temp folder
    pseudonymise_ids: bool = False        # keyed HMAC-SHA256 of customer_id instead of the raw id
    hmac_key_env: str = "CVSEG_EXPORT_HMAC_KEY"   # environment variable holding the HMAC key
    s3_endpoint_url: str | None = None    # S3-compatible endpoint (MinIO, tests); None: AWS
    multipart_chunk_mb: int = Field(default=64, ge=5)
    # what the client's tools open: utf-8-sig (a BOM: Excel) or cp932 (Japanese Windows, Excel)
    encoding: Literal["utf-8", "utf-8-sig", "cp932"] = "utf-8"
    # header text per column (customer_id, segment, generation_id, predicted_value, p_alive);
    # unset columns keep their names (predicted_value_<horizon>m)
    header: dict[str, str] = Field(default_factory=dict)
    date_format: str = "%Y-%m-%d"         # the as-of date in the file names (strftime), e.g. %Y%m%d
    # with several sources (identity_map): one more column per source, <source>_customer_ids, the
    # customer's ids in that source ("|"-separated, sorted; pseudonymised like customer_id)
    source_ids: bool = False

    @field_validator("header")
    @classmethod
    def _header_columns(cls, value: dict[str, str]) -> dict[str, str]:
        known = ("customer_id", "segment", "generation_id", "predicted_value", "p_alive")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; the export's columns are {list(known)}")
        if any(not text.strip() for text in value.values()):
            raise ValueError("header names must not be empty")
        return value

    @field_validator("date_format")
    @classmethod
    def _file_date(cls, value: str) -> str:
        import datetime as _dt

        text = _dt.date(2026, 9, 30).strftime(value)
        if "%" not in value or text == value or any(c in text for c in '/\\:*?"<>|'):
            raise ValueError(f"{value!r} is not a strftime format giving a file-name-safe date (e.g. %Y%m%d)")
        return value


class SegmentBand(_Frozen):
    """One value band: customers whose predicted 6-month net value reaches ``lower`` (a quantile in
    (0, 1) with ``band_method: quantile``, an amount in business.currency with ``value``)."""

    name: str = Field(min_length=1)
    lower: float | None = None            # None: the bottom band, which takes everyone left


# The segment vocabulary, one home: the lifecycle segments every generation has beside the value
# bands, and the markers the migration matrix and the trend tables use for "no segment".
NEW, DORMANT = "new", "dormant"
NO_SEGMENT, GONE = "(none)", "(gone)"            # segment_migration: a newcomer / a customer no longer scored
UNSEGMENTED = "(unsegmented)"                    # trend tables: a customer not placed yet
LIFECYCLE_SEGMENTS = (NEW, DORMANT)
RESERVED_SEGMENT_NAMES = (*LIFECYCLE_SEGMENTS, NO_SEGMENT, GONE, UNSEGMENTED)


class SegmentsConf(_Frozen):
    """Segment generations (`cvseg segments`): value bands plus the lifecycle segments."""

    generation_months: int = Field(default=6, ge=1)
    band_method: Literal["quantile", "value"] = "quantile"
    bands: tuple[SegmentBand, ...] = (
        SegmentBand(name="top", lower=0.9), SegmentBand(name="high", lower=0.7),
        SegmentBand(name="middle", lower=0.4), SegmentBand(name="low", lower=None))
    quantile_relative_error: float = Field(default=0.001, ge=0.0, le=0.1)
    new_customer_days: int = Field(default=90, ge=0)       # 0: no `new` segment
    dormant_p_alive: float = Field(default=0.2, ge=0.0, le=1.0)  # 0: no `dormant` segment
    # the text the export (and the client's tools) show per segment, e.g. {top: 優良, new: 新規}
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_bands(self) -> "SegmentsConf":
        names = [b.name for b in self.bands]
        if not names:
            raise ValueError("bands: list at least one band")
        if len(set(names)) != len(names):
            raise ValueError(f"bands: names must be unique (got {names})")
        reserved = sorted(set(names) & set(RESERVED_SEGMENT_NAMES))
        if reserved:
            raise ValueError(f"bands: {reserved} are reserved segment names; rename the band")
        lowers = [b.lower for b in self.bands]
        if lowers[-1] is not None or any(v is None for v in lowers[:-1]):
            raise ValueError("bands: list bands from the highest down; every band but the last needs "
                             "`lower`, the last (bottom) band has `lower: null`")
        bounded = [float(v) for v in lowers[:-1]]
        if any(a <= b for a, b in zip(bounded, bounded[1:])):
            raise ValueError(f"bands: `lower` must strictly decrease from the first band down (got {bounded})")
        if self.band_method == "quantile" and any(not 0.0 < v < 1.0 for v in bounded):
            raise ValueError(f"bands: with band_method quantile every `lower` is a quantile in (0, 1) "
                             f"(got {bounded}); use band_method: value for amounts")
        unknown = sorted(set(self.labels) - set(names) - set(LIFECYCLE_SEGMENTS))
        if unknown:
            raise ValueError(f"labels: {unknown} are not segments; label the bands {names}, new or dormant")
        if len(set(self.labels.values())) != len(self.labels) or any(not t.strip() for t in self.labels.values()):
            raise ValueError("labels: every label must be non-empty and different from the others")
        return self


class TrendsConf(_Frozen):
    """Trend tables (`cvseg trends`)."""

    years: int = Field(default=5, ge=1)                 # trend_yearly / trend_yearly_category window
    recompute_weeks: int = Field(default=4, ge=0)       # always recompute at least the last N weeks


class ReportConf(_Frozen):
    """Diagnostic and weekly reports (`cvseg report`)."""

    language: Literal["ja", "en"] = "ja"
    output_dir: str | None = None          # None: <storage.warehouse>/reports
    formats: tuple[Literal["html", "pdf"], ...] = ("html", "pdf")


class RetentionConf(_Frozen):
    """How long `cvseg maintain` keeps dated partitions (days before its as-of date; None: forever).
    The latest partition is never pruned."""

    customer_features_days: int | None = Field(default=400, ge=1)
    customer_scores_days: int | None = Field(default=400, ge=1)


class MaintenanceConf(_Frozen):
    """Table maintenance in the nightly run (`cvseg run`, step `maintain`)."""

    every_days: int = Field(default=7, ge=0)   # 0: never in the nightly run (`cvseg maintain` still works)


class Config(_Frozen):
    env: Literal["local", "databricks", "emr"] = "local"
    client: str = "demo"
    spark: SparkConf = SparkConf()
    storage: StorageConf = StorageConf()
    business: BusinessConf = BusinessConf()
    source: SourceConf
    # several order sources (ec, store): each entry is layered over `source` (which then holds
    # the defaults they share); empty: `source` alone, a list of one
    sources: tuple[SourceConf, ...] = ()
    identity: IdentityConf = IdentityConf()
    validation: ValidationConf = ValidationConf()
    features: FeaturesConf = FeaturesConf()
    models: ModelsConf = ModelsConf()
    tracking: TrackingConf = TrackingConf()
    segments: SegmentsConf = SegmentsConf()
    trends: TrendsConf = TrendsConf()
    export: ExportConf = ExportConf()
    report: ReportConf = ReportConf()
    retention: RetentionConf = RetentionConf()
    maintenance: MaintenanceConf = MaintenanceConf()

    @model_validator(mode="before")
    @classmethod
    def _layer_sources(cls, data: Any) -> Any:
        """Each `sources` entry inherits every key of `source` it does not set."""
        if not isinstance(data, dict) or not data.get("sources"):
            return data
        base = data.get("source") or {}
        if not isinstance(data["sources"], (list, tuple)):
            return data   # the type error names `sources`
        layered = [deep_merge(base, entry) if isinstance(entry, dict) else entry for entry in data["sources"]]
        return {**data, "sources": layered}

    @model_validator(mode="after")
    def _check_sources(self) -> "Config":
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: every source needs a name of its own (got {names}); "
                             "e.g. sources: [{name: ec, ...}, {name: store, ...}]")
        if len(self.sources) > 1 and "default" in names:
            raise ValueError("sources: name each source (e.g. ec, store); `default` is the name of a lone `source`")
        keys = self.identity.match_on
        if keys and not any(getattr(s.columns, key) for s in self.order_sources for key in keys):
            raise ValueError(f"identity.match_on {list(keys)}: no source maps such a column; set "
                             f"source.columns.{keys[0]} (or sources[].columns.{keys[0]}) to the export's column")
        return self

    @property
    def order_sources(self) -> tuple[SourceConf, ...]:
        """The sources to ingest: `sources`, or the lone `source` as a list of one."""
        return self.sources or (self.source,)

    @property
    def champion_metric(self) -> str:
        """The backtest metric that picks the champion: ``models.champion_metric``, with ``auto`` chosen
        by what the segments do with the value. Quantile bands cut customers by their rank, so what
        matters is ordering them by what they will spend: ``normalized_gini`` (the whole capture
        curve: top 10%, 30%, 60% ... at once, weighted by revenue). Value bands cut at amounts, so the
        amounts must be right: ``mae``."""
        if self.models.champion_metric != "auto":
            return self.models.champion_metric
        return "normalized_gini" if self.segments.band_method == "quantile" else "mae"

    @property
    def has_identity_step(self) -> bool:
        """Several sources or an identity config: orders are read through `identity_map`."""
        return len(self.order_sources) > 1 or self.identity.is_configured

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _read_yaml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _packaged(name: str) -> dict[str, Any]:
    text = files("conf").joinpath(name).read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``; mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], parsed value); the value is read as YAML (numbers, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if not err["loc"]:   # a check across sections: its message names the keys (the input is everything)
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (see conf/README.md for the keys that exist)")
        elif err["type"] == "missing":
            lines.append(f"  {path}: required key is missing")
        elif isinstance(err.get("input"), dict):   # a check across a section's keys: the message names them
            lines.append(f"  {path}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {path}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration:\n" + "\n".join(lines)


#: Keys that moved: old dotted path -> new one. A layer (a conf file, --set) that uses the old path is
#: read as the new one with a warning; setting both in one layer is an error.
MOVED_KEYS: dict[str, str] = {
    "features.horizon_months": "models.horizon_months",   # 2026-12: the horizon is the models' (#18)
}


def _move_keys(layer: dict[str, Any], where: str) -> dict[str, Any]:
    """``layer`` with every :data:`MOVED_KEYS` old path (section.key) moved to its new one (a copy when any moved)."""
    for old, new in MOVED_KEYS.items():
        old_parts, new_parts = old.split("."), new.split(".")
        parent = layer.get(old_parts[0])
        if not isinstance(parent, dict) or old_parts[1] not in parent:
            continue
        layer = copy.deepcopy(layer)
        value = layer[old_parts[0]].pop(old_parts[1])
        target = layer.setdefault(new_parts[0], {})
        if not isinstance(target, dict):
            raise ConfigError(f"{where}: {new_parts[0]} is not a section")
        if new_parts[1] in target and target[new_parts[1]] != value:
            raise ConfigError(f"{where}: {old} ({value!r}) and {new} ({target[new_parts[1]]!r}) both set; "
                              f"{old} is the old name of {new}: keep {new} only")
        target[new_parts[1]] = value
        log.warning("config %s: %s is now %s (read as such; rename it)", where, old, new)
    return layer


def _move_overrides(set_items: list[tuple[list[str], Any]]) -> list[tuple[list[str], Any]]:
    """``--set`` items with every :data:`MOVED_KEYS` old path renamed, as :func:`_move_keys` does for
    a file: the --set layer may not give an old path and its new one different values."""
    given = {".".join(parts): value for parts, value in set_items}
    moved = []
    for parts, value in set_items:
        old = ".".join(parts)
        new = MOVED_KEYS.get(old)
        if new is None:
            moved.append((parts, value))
            continue
        if new in given and given[new] != value:
            raise ConfigError(f"--set: {old} ({value!r}) and {new} ({given[new]!r}) both set; "
                              f"{old} is the old name of {new}: keep {new} only")
        log.warning("config --set: %s is now %s (read as such; rename it)", old, new)
        moved.append((new.split("."), value))
    return moved


def resolve_layers(conf_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The merged (not yet validated) mapping of every layer."""
    user = _move_keys(_read_yaml(conf_path), str(conf_path)) if conf_path else {}
    set_items = _move_overrides([parse_override(o) for o in overrides])
    env = user.get("env", "local")
    for parts, value in set_items:
        if parts == ["env"]:
            env = value
    if env not in ENVIRONMENTS:
        raise ConfigError(f"env: must be one of {', '.join(ENVIRONMENTS)} (got {env!r})")
    data = deep_merge(_packaged("base.yaml"), _packaged(f"{env}.yaml"))
    data = deep_merge(data, user)
    data["env"] = env
    for parts, value in set_items:
        _apply_override(data, parts, value)
    return data


def load_config(conf_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Parse every layer once into a frozen :class:`Config`."""
    data = resolve_layers(conf_path, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def dump_config(config: Config, path: str | Path) -> Path:
    """Write the fully resolved config, so a run can be repeated with ``--conf path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
