"""One set of S3 settings (``storage.s3``) for every S3 client of the engine.

Three clients reach the bucket: Spark's s3a file system (tables, the source export), boto3 (the
export's upload) and MLflow's artifact store (boto3 too, configured through environment variables
of this process). Each gets the same endpoint, addressing style, region and retry limits from
:class:`core.config.S3Conf`. Credentials are never set here: s3a and boto3 both read the standard
chains (AWS_* environment variables, ~/.aws, the instance profile / container role).
"""
from __future__ import annotations

import os
import re
from urllib.parse import urlparse

from core.config import S3Conf

S3_SCHEMES = ("s3://", "s3a://", "s3n://")

#: The one place an S3 URI's scheme is chosen per client: boto3 / MLflow speak s3://, Hadoop s3a://.
_HADOOP_S3A = "org.apache.hadoop.fs.s3a.S3AFileSystem"


def is_s3(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(S3_SCHEMES)


def as_boto_uri(uri: str) -> str:
    """s3a://b/k or s3n://b/k -> s3://b/k (the scheme boto3 and MLflow's artifact store know)."""
    return "s3://" + uri.split("://", 1)[1] if is_s3(uri) else uri


def hadoop_settings(conf: S3Conf, map_s3_scheme: bool) -> dict[str, str]:
    """``spark.hadoop.fs.s3a.*`` for a session this engine starts.

    ``map_s3_scheme``: also read ``s3://`` with S3AFileSystem. Right for a JVM started here
    (local or a standalone cluster: plain Hadoop has no s3:// file system); never on EMR, where
    s3:// is EMRFS and the platform's session is reused as it is.

    Retries (Hadoop 3.4 S3ARetryPolicy): the AWS SDK first retries a request up to
    ``fs.s3a.attempts.maximum`` times (max_attempts - 1) (500 InternalError, 503 SlowDown, connection resets);
    what still fails is retried by s3a with exponential backoff from ``fs.s3a.retry.interval``:
    throttling (503) up to ``fs.s3a.retry.throttle.limit`` times, other 5xx errors
    (``fs.s3a.retry.http.5xx.errors``) and network errors up to ``fs.s3a.retry.limit`` times.
    """
    interval = f"{conf.retry_interval_ms}ms"
    settings = {
        # the SDK's retries after the first attempt (Hadoop's AWSClientConfig: numRetries)
        "fs.s3a.attempts.maximum": str(conf.max_attempts - 1),
        "fs.s3a.retry.limit": str(conf.retry_limit),
        "fs.s3a.retry.interval": interval,
        "fs.s3a.retry.throttle.limit": str(conf.throttle_retry_limit),
        "fs.s3a.retry.throttle.interval": interval,
        "fs.s3a.retry.http.5xx.errors": "true",
        "fs.s3a.path.style.access": "true" if conf.path_style_access else "false",
    }
    if conf.endpoint_url:
        settings["fs.s3a.endpoint"] = conf.endpoint_url
        if conf.endpoint_url.startswith("http://"):
            settings["fs.s3a.connection.ssl.enabled"] = "false"
    if conf.region:
        settings["fs.s3a.endpoint.region"] = conf.region
    elif conf.endpoint_url:
        # the SDK needs a region to sign with; an S3-compatible store ignores which
        settings["fs.s3a.endpoint.region"] = os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION") or "us-east-1"
    if map_s3_scheme:
        settings["fs.s3.impl"] = _HADOOP_S3A
        settings["fs.AbstractFileSystem.s3.impl"] = "org.apache.hadoop.fs.s3a.S3A"
    return {f"spark.hadoop.{key}": value for key, value in settings.items()}


def boto3_client(conf: S3Conf, endpoint_url: str | None = None):
    """A boto3 S3 client with ``storage.s3``'s endpoint (or ``endpoint_url``, e.g.
    export.s3_endpoint_url), addressing style, region and retries ("standard" mode: 500, 502,
    503, 504 and SlowDown/throttling are retried with exponential backoff)."""
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(
        region_name=conf.region,
        retries={"total_max_attempts": conf.max_attempts, "mode": "standard"},   # the first one included
        s3={"addressing_style": "path" if conf.path_style_access else "auto"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or conf.endpoint_url, config=config)


def set_mlflow_environment(conf: S3Conf) -> None:
    """MLflow's S3 artifact store builds its own boto3 client from environment variables: point
    it at ``storage.s3`` in this process (nobody has to export them). Values the user exported
    win for the retry settings; the endpoint follows the conf when the conf names one."""
    if conf.endpoint_url:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = conf.endpoint_url
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", str(conf.max_attempts))
    if conf.region:
        os.environ.setdefault("AWS_DEFAULT_REGION", conf.region)


def bucket_and_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(as_boto_uri(uri))
    return parsed.netloc, parsed.path.lstrip("/")


# An s3a failure, as Hadoop words it: "<operation> on s3a://b/k: ...S3Exception: <message>
# (Service: S3, Status Code: 503, Request ID: ...):SlowDown"; boto3's: "An error occurred
# (SlowDown) when calling the PutObject operation ...".
_S3A_ERROR = re.compile(r"(?P<op>\b\w+ on s3a?://[^\s:]+)[^\n]*?Status Code: (?P<status>\d{3})[^)\n]*\)(?::(?P<code>\w+))?")
_S3A_CLASS = re.compile(r"org\.apache\.hadoop\.fs\.s3a\.(?P<cls>AWS\w+Exception|\w*Throttl\w*Exception)")
_BOTO_ERROR = re.compile(r"An error occurred \((?P<code>[\w.]+)\) when calling the (?P<op>\w+) operation")


def s3_error_summary(exc: BaseException | None) -> str | None:
    """One line naming the S3 error behind ``exc`` (its code, HTTP status and operation), or None
    when the failure was not an S3 error. Looks through the exception chain, Java's included."""
    texts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    text = "\n".join(texts)
    found = _S3A_ERROR.search(text)
    if found:
        code = found["code"] if found["code"] not in (None, "null") else None
        what = f"{code} (HTTP {found['status']})" if code else f"HTTP {found['status']}"
        return f"S3 error {what} on {found['op']}"
    found = _BOTO_ERROR.search(text)
    if found:
        return f"S3 error {found['code']} on {found['op']}"
    found = _S3A_CLASS.search(text)
    if found:
        line = next((ln for ln in text.splitlines() if found["cls"] in ln), found["cls"]).strip()
        return f"S3 error {line[:300]}"
    return None

