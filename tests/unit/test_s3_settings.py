"""storage.s3 -> the settings of each S3 client; the tracking target of an S3 warehouse; S3 errors
named in one line. No Spark, no network."""
from __future__ import annotations

import pytest

from core.config import ConfigError, S3Conf, load_config
from core.s3 import boto3_client, hadoop_settings, s3_error_summary, set_mlflow_environment
from core.tracking import tracking_target


def _config(*overrides: str):
    return load_config(None, ["source.path=s3a://b/in", *overrides])


def test_hadoop_settings_follow_storage_s3():
    conf = S3Conf(endpoint_url="http://127.0.0.1:9000", path_style_access=True, max_attempts=4, retry_limit=3,
                  retry_interval_ms=250, throttle_retry_limit=9)
    settings = hadoop_settings(conf, map_s3_scheme=True)
    assert settings["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    assert settings["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert settings["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert settings["spark.hadoop.fs.s3a.attempts.maximum"] == "3"     # retries after the first attempt
    assert settings["spark.hadoop.fs.s3a.retry.limit"] == "3"
    assert settings["spark.hadoop.fs.s3a.retry.throttle.limit"] == "9"
    assert settings["spark.hadoop.fs.s3a.retry.interval"] == "250ms"
    assert settings["spark.hadoop.fs.s3.impl"] == "org.apache.hadoop.fs.s3a.S3AFileSystem"
    assert "spark.hadoop.fs.s3a.endpoint.region" in settings      # the SDK must sign with some region
    # a reused platform session (EMR): s3:// stays EMRFS; AWS itself: no endpoint set
    aws = hadoop_settings(S3Conf(region="ap-northeast-1"), map_s3_scheme=False)
    assert not any(k.startswith("spark.hadoop.fs.s3.") or k.endswith(".endpoint") for k in aws)
    assert aws["spark.hadoop.fs.s3a.endpoint.region"] == "ap-northeast-1"
    assert not any("key" in k.lower() or "secret" in k.lower() for k in settings)   # credentials: chains only


def test_boto3_and_mlflow_get_the_same_endpoint_and_retries(monkeypatch):
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    conf = S3Conf(endpoint_url="http://127.0.0.1:9000", path_style_access=True, max_attempts=7, region="us-east-1")
    client = boto3_client(conf)
    assert client.meta.endpoint_url == "http://127.0.0.1:9000"
    assert client.meta.config.retries == {"total_max_attempts": 7, "mode": "standard"}
    assert client.meta.config.s3["addressing_style"] == "path"
    assert boto3_client(conf, "http://127.0.0.1:9999").meta.endpoint_url == "http://127.0.0.1:9999"  # export override
    set_mlflow_environment(conf)
    import os

    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert os.environ["AWS_MAX_ATTEMPTS"] == "7" and os.environ["AWS_RETRY_MODE"] == "standard"


def test_endpoint_url_is_checked():
    with pytest.raises(ConfigError, match="storage.s3.endpoint_url"):
        _config("storage.s3.endpoint_url=127.0.0.1:9000")
    with pytest.raises(ConfigError, match="must not hold credentials"):
        _config("storage.s3.endpoint_url=http://key:secret@127.0.0.1:9000")


def test_tracking_on_an_s3_warehouse(tmp_path):
    with pytest.raises(ConfigError, match="tracking.uri"):
        tracking_target(_config("storage.warehouse=s3a://b/wh"))
    target = tracking_target(_config("storage.warehouse=s3a://b/wh/", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                                     "storage.s3.endpoint_url=http://127.0.0.1:9000"))
    assert target.artifact_root == "s3://b/wh/mlflow-artifacts"      # MLflow's S3 store speaks s3://
    assert target.s3.endpoint_url == "http://127.0.0.1:9000"
    explicit = tracking_target(_config("storage.warehouse=s3a://b/wh", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                                       "tracking.artifact_location=s3a://other/art"))
    assert explicit.artifact_root == "s3://other/art"
    local = tracking_target(_config(f"storage.warehouse={tmp_path / 'wh'}"))
    assert local.uri.startswith("sqlite:///") and local.artifact_root.startswith("file://") and local.s3 is None
    # a local sqlite store named explicitly: artifacts beside the warehouse too, not in ./mlruns
    named = tracking_target(_config(f"storage.warehouse={tmp_path / 'wh'}", f"tracking.uri=sqlite:///{tmp_path}/m.db"))
    assert named.artifact_root == (tmp_path / "wh" / "mlflow-artifacts").resolve().as_uri()
    server = tracking_target(_config(f"storage.warehouse={tmp_path / 'wh'}", "tracking.uri=http://127.0.0.1:5000"))
    assert server.artifact_root is None       # a tracking server keeps its own artifact store


def test_s3_errors_are_named_in_one_line():
    s3a = RuntimeError(
        "An error occurred while calling o81.load.\n: org.apache.hadoop.fs.s3a.AWSServiceThrottledException: "
        "getFileStatus on s3a://b/wh/orders/_delta_log: software.amazon.awssdk.services.s3.model.S3Exception: "
        "Please reduce your request rate. (Service: S3, Status Code: 503, Request ID: r1):SlowDown\n\tat x")
    assert s3_error_summary(s3a) == "S3 error SlowDown (HTTP 503) on getFileStatus on s3a://b/wh/orders/_delta_log"
    wrapped = ValueError("step failed")
    wrapped.__cause__ = RuntimeError("An error occurred (InternalError) when calling the PutObject operation "
                                     "(reached max retries: 9): We encountered an internal error.")
    assert s3_error_summary(wrapped) == "S3 error InternalError on PutObject"
    assert s3_error_summary(ValueError("no such column: amount")) is None


def test_deltalake_backend_is_refused_on_an_s3_warehouse():
    from core.storage import Storage, StorageError

    # refused before the session is touched: the deltalake backend commits files on a local disk
    with pytest.raises(StorageError, match="storage.backend: deltalake writes local folders only.*delta-spark"):
        Storage(None, "s3a://b/wh", "deltalake")
