"""Config: layering, overrides, rejection of unknown keys and wrong types with the key path named."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from core.config import Config, ConfigError, ModelsConf, dump_config, load_config

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_layers_base_env_user_and_overrides(tmp_path):
    user = tmp_path / "client.yaml"
    user.write_text(yaml.safe_dump({"client": "acme", "features": {"time_unit": "weeks"},
                                    "source": {"columns": {"order_id": "受注番号"}}}), encoding="utf-8")
    config = load_config(user, ["validation.max_rejected_share=0.1", "spark.extra={'a.b': 'c'}"])
    assert config.env == "local"
    assert config.spark.master == "local[*]"            # from local.yaml
    assert config.client == "acme"                      # from the user file
    assert config.source.columns.order_id == "受注番号"
    assert config.source.columns.customer_id == "customer_id"  # base value kept by the deep merge
    assert config.features.time_unit == "weeks"
    assert config.validation.max_rejected_share == 0.1
    assert config.spark.extra == {"a.b": "c"}


def test_environment_files_select_cluster_settings():
    config = load_config(None, ["env=databricks"])
    assert config.spark.master is None and config.storage.backend == "delta-spark"
    assert load_config(None, ["env=emr"]).storage.warehouse.startswith("s3://")
    with pytest.raises(ConfigError, match="env: must be one of"):
        load_config(None, ["env=laptop"])


@pytest.mark.parametrize("override, message", [
    ("source.columns.order_idd=x", r"source\.columns\.order_idd: unknown key"),
    ("validation.max_rejected_share=lots", r"validation\.max_rejected_share: .*valid number"),
    ("validation.max_rejected_share=1.5", r"validation\.max_rejected_share: .*less than or equal to 1"),
    ("features.time_unit=months", r"features\.time_unit: .*'days' or 'weeks'"),
    ("features.trailing_months=[0]", r"features\.trailing_months: .*positive"),
    ("features.trailing_months=[3,6,24]", r"features\.trailing_months: .*must be \[3, 6, 12\].*core/tables\.py"),
    ("storage.backend=hive", r"storage\.backend"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_moved_key_is_read_under_its_new_name_with_a_warning(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"features": {"horizon_months": 3, "time_unit": "weeks"}}), encoding="utf-8")
    with caplog.at_level("WARNING", logger="core.config"):
        config = load_config(old)
    assert config.models.horizon_months == 3 and config.features.time_unit == "weeks"
    assert "features.horizon_months is now models.horizon_months" in caplog.text
    assert load_config(None, ["features.horizon_months=12"]).models.horizon_months == 12
    assert load_config(old, ["models.horizon_months=9"]).models.horizon_months == 9   # a later layer wins
    assert "horizon_months" not in load_config(old).to_dict()["features"]
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"features": {"horizon_months": 3}, "models": {"horizon_months": 6}}),
                    encoding="utf-8")
    with pytest.raises(ConfigError, match="features.horizon_months .* and models.horizon_months .* both set"):
        load_config(both)
    # the same rule within the --set layer (the same value twice is no conflict)
    with pytest.raises(ConfigError, match="--set: features.horizon_months .3. and models.horizon_months .6. both"):
        load_config(None, ["features.horizon_months=3", "models.horizon_months=6"])
    assert load_config(None, ["features.horizon_months=3", "models.horizon_months=3"]).models.horizon_months == 3


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("source: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["features.time_unit"])


def test_config_is_frozen_and_round_trips(tmp_path):
    config = load_config(None, ["client=acme"])
    with pytest.raises(Exception):
        config.client = "other"  # type: ignore[misc]
    again = load_config(dump_config(config, tmp_path / "resolved.yaml"))
    assert again == config


@pytest.mark.parametrize("name", ["base.yaml", "local.yaml", "databricks.yaml", "emr.yaml"])
def test_shipped_files_hold_no_secrets(name):
    text = (CONF / name).read_text(encoding="utf-8").lower()
    for word in ("password", "secret", "aws_access_key", "token:"):
        assert word not in text


def test_every_key_is_documented_in_conf_readme():
    from core.config import Config

    readme = (CONF / "README.md").read_text(encoding="utf-8")

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            yield path
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from keys(annotation, path + ".")

    missing = [k for k in keys(Config) if f"`{k}`" not in readme]
    assert not missing, f"keys not documented in conf/README.md: {missing}"


def test_export_and_label_settings_are_checked():
    from core.config import ExportConf, SegmentsConf

    assert ExportConf(date_format="%Y%m%d").date_format == "%Y%m%d"
    for bad in ("yyyyMMdd", "%Y/%m/%d"):   # no strftime field; a slash in a file name
        with pytest.raises(ValueError, match="file-name-safe date"):
            ExportConf(date_format=bad)
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['predicted_value_6m'\]"):
        ExportConf(header={"predicted_value_6m": "予測"})
    assert SegmentsConf(labels={"top": "優良", "new": "新規", "dormant": "休眠"}).labels["new"] == "新規"
    with pytest.raises(ValueError, match=r"labels: \['vip'\] are not segments"):
        SegmentsConf(labels={"vip": "優良"})
    with pytest.raises(ValueError, match="different from the others"):
        SegmentsConf(labels={"top": "優良", "high": "優良"})


def test_sources_inherit_source_and_a_lone_source_is_a_list_of_one():
    lone = load_config(None, ["source.path=/data/orders.csv"])
    assert [(s.name, s.path) for s in lone.order_sources] == [("default", "/data/orders.csv")]
    assert not lone.has_identity_step
    config = load_config(None, ["source.columns.order_ts=受注日",
                                "sources=[{name: ec, path: /ec}, {name: store, path: /pos, channel: store, "
                                "csv: {encoding: cp932}, columns: {customer_id: 会員番号}}]"])
    ec, store = config.order_sources
    assert (ec.columns.order_ts, store.columns.order_ts) == ("受注日", "受注日")   # inherited from `source`
    assert (ec.columns.customer_id, store.columns.customer_id) == ("customer_id", "会員番号")
    assert (ec.csv.encoding, store.csv.encoding, store.channel) == ("utf-8", "cp932", "store")
    assert config.has_identity_step
    assert load_config(None, ["identity.phone_country_code=44"]).identity.phone_country_code == "44"


@pytest.mark.parametrize("overrides, message", [
    (["sources=[{name: ec}, {name: ec}]"], "every source needs a name of its own"),
    (["sources=[{name: ec}, {name: default}]"], "name each source"),
    (["sources=[{name: EC}]"], "'EC' is not a source name"),
    (["sources=[{name: store, channel: store, columns: {channel: media}}]"], "not both"),
    (["identity.match_on=[email]"], "no source maps such a column; set source.columns.email"),
    (["identity.phone_country_code='+81'"], "country calling code"),
])
def test_bad_sources_and_identity_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_base_yaml_states_the_models_defaults():
    """conf/base.yaml is the readable copy of the pydantic defaults: it may not drift from them. The one
    key without a model default is source.columns (the client maps their export; base.yaml names the
    canonical columns)."""
    base = yaml.safe_load((CONF / "base.yaml").read_text(encoding="utf-8"))
    from_yaml = Config.model_validate(base).model_dump(mode="json")
    from_models = Config.model_validate({"source": {"columns": base["source"]["columns"]}}).model_dump(mode="json")
    assert from_yaml == from_models


def test_champion_metrics_are_the_metric_registry():
    from typing import get_args

    from models.metrics import METRIC_DIRECTION

    choices = get_args(ModelsConf.model_fields["champion_metric"].annotation)
    assert set(choices) == {"auto", *METRIC_DIRECTION}


@pytest.mark.parametrize("overrides, metric", [
    ([], "normalized_gini"),                                       # quantile bands: the ranking decides
    (["segments.band_method=value", "segments.bands=[{name: top, lower: 50000}, {name: rest, lower: null}]"], "mae"),
    (["models.champion_metric=spearman"], "spearman"),             # named: taken as it is
    (["models.champion_metric=mae"], "mae"),
])
def test_auto_champion_metric_follows_how_segments_use_the_value(overrides, metric):
    assert load_config(None, overrides).champion_metric == metric


@pytest.mark.parametrize("overrides, message", [
    (["source.columns.gross_amount=null"], r"source: map columns\.gross_amount, or both columns\.quantity"),
    (["source.grain=line", "source.columns.order_id=null"], r"source: grain: line needs columns\.order_id"),
    (["source.cancellation.style=status"], r"source: cancellation\.style: status needs columns\.status"),
    (["source.allowed_currencies=[JPY]"], r"source: allowed_currencies is set but columns\.currency"),
    (["source.timestamp_format=%Y-%m-%d"], r"source: timestamp_format '%Y-%m-%d': use Spark datetime patterns"),
])
def test_mappings_that_cannot_work_are_refused_when_the_config_is_read(overrides, message):
    """Checked at load (core.config.SourceConf), before any Spark session or file read."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    # a mapping that derives gross from its lines is fine
    load_config(None, ["source.columns.gross_amount=null", "source.columns.quantity=qty",
                       "source.columns.unit_price=price"])


@pytest.mark.parametrize("env", ["databricks", "emr"])
def test_cluster_environments_keep_generated_code_and_read_no_count_for_it(env):
    # their clients are large, and a per-step task (Databricks' bundle) would pay a first read of
    # features_runs just to learn it; locally small warehouses run interpreted
    assert load_config(None, [f"env={env}"]).spark.interpreted_below_customers == 0
    assert load_config(None, []).spark.interpreted_below_customers == 50_000
