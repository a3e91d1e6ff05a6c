"""Export: one CSV + manifest per date, to a local folder or S3 (moto's server on 127.0.0.1)."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json

import pytest
from pyspark.sql import functions as F

from core.config import ExportConf
from pipelines import export as export_mod
from pipelines.export import ExportError, export_rows, parse_destination, publish_export

D = dt.date(2026, 9, 30)
HEADER = "customer_id,segment,generation_id,predicted_value_6m,p_alive"


@pytest.fixture()
def s3(moto_endpoint, monkeypatch):
    """A fresh bucket; credentials only through boto3's standard chain (here: the environment)."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    bucket = f"crm-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def _frames(spark, n: int, value_offset: float = 0.0, segment_suffix: str = ""):
    """n scored customers; every 7th has no segment yet; one id needs CSV quoting."""
    scores = (spark.range(n).select(
        F.lit(D).alias("as_of_date"),
        F.when(F.col("id") == 3, F.lit('C,"quoted"')).otherwise(F.format_string("C%08d", F.col("id"))).alias("customer_id"),
        (F.col("id") * 1.25 + F.lit(value_offset)).alias("predicted_net_value"),
        (F.col("id") % 100 / 100.0).alias("p_alive")))
    other_day = spark.createDataFrame([(dt.date(2026, 9, 29), "C00000001", 9.0, 0.1)], scores.schema)
    segments = (spark.range(n).where(F.col("id") % 7 != 0).select(
        F.when(F.col("id") == 3, F.lit('C,"quoted"')).otherwise(F.format_string("C%08d", F.col("id"))).alias("customer_id"),
        F.concat(F.when(F.col("id") % 2 == 0, F.lit("top 10%")).otherwise(F.lit("dormant")),
                 F.lit(segment_suffix)).alias("segment"),
        F.lit("2026H2").alias("generation_id"), F.lit(D).alias("valid_from")))
    return scores.unionByName(other_day), segments


def _expected_without_segment(n: int) -> int:
    return len(range(0, n, 7))


def test_s3_export_uploads_manifest_matches_and_reexport_replaces(spark, s3, moto_endpoint):
    client, bucket = s3
    n = 2_002
    long = " " + "x" * 3300   # long segment names: ~6.6 MB, above the 5 MiB chunk, so upload and copy are multipart
    conf = ExportConf(s3_endpoint_url=moto_endpoint, multipart_chunk_mb=5)
    dest = parse_destination(f"s3://{bucket}/crm/daily/")
    scores, segments = _frames(spark, n, segment_suffix=long)
    first = publish_export(export_rows(scores, segments, D), D, conf, dest)

    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["crm/daily/customer_segments_2026-09-30.csv", "crm/daily/customer_segments_2026-09-30.manifest.json"]
    body = client.get_object(Bucket=bucket, Key=keys[0])["Body"].read()
    manifest = json.loads(client.get_object(Bucket=bucket, Key=keys[1])["Body"].read())
    assert len(body) > 5 * 1024 * 1024
    assert client.head_object(Bucket=bucket, Key=keys[0])["ETag"].count("-") == 1   # multipart ETag
    assert manifest["sha256"] == hashlib.sha256(body).hexdigest() == first.sha256
    assert manifest["rows"] == n == body.count(b"\n") - 1
    assert manifest["as_of_date"] == "2026-09-30" and manifest["generation_id"] == "2026H2"
    assert manifest["columns"] == HEADER.split(",")
    assert manifest["customers_without_segment"] == _expected_without_segment(n)
    assert manifest["engine_version"]
    lines = body.decode("utf-8").split("\n")
    assert lines[0] == HEADER
    assert lines[1] == f'"C,""quoted""",dormant{long},2026H2,3.75,0.030000'   # "," sorts before "0"
    assert lines[2] == 'C00000000,,,0.00,0.000000'
    assert lines[-2] == f"C00002001,dormant{long},2026H2,2501.25,0.010000"
    ids = [line.split(",")[0] for line in lines[1:-1] if not line.startswith('"')]
    assert ids == sorted(ids)

    # Re-export the same date with changed values: same two keys, new content, no temporary keys.
    scores2, segments = _frames(spark, 1000, value_offset=1.0)
    second = publish_export(export_rows(scores2, segments, D), D, conf, dest)
    keys2 = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys2 == keys
    body2 = client.get_object(Bucket=bucket, Key=keys[0])["Body"].read()
    manifest2 = json.loads(client.get_object(Bucket=bucket, Key=keys[1])["Body"].read())
    assert second.sha256 != first.sha256
    assert manifest2["sha256"] == hashlib.sha256(body2).hexdigest() == second.sha256
    assert body2.split(b"\n")[2] == b"C00000000,,,1.00,0.000000"


def test_s3_upload_error_names_bucket_and_credentials(spark, s3, moto_endpoint):
    scores, segments = _frames(spark, 10)
    conf = ExportConf(s3_endpoint_url=moto_endpoint)
    with pytest.raises(ExportError, match="no-such-bucket.*credentials"):
        publish_export(export_rows(scores, segments, D), D, conf, parse_destination("s3://no-such-bucket/x/"))


def test_local_export_is_atomic_and_replaces(spark, tmp_path, monkeypatch):
    scores, segments = _frames(spark, 500)
    folder = tmp_path / "out"
    first = publish_export(export_rows(scores, segments, D), D, ExportConf(), parse_destination(str(folder)))
    csv = folder / "customer_segments_2026-09-30.csv"
    manifest_path = folder / "customer_segments_2026-09-30.manifest.json"
    original = csv.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == [csv.name, manifest_path.name]
    assert json.loads(manifest_path.read_text())["sha256"] == hashlib.sha256(original).hexdigest() == first.sha256
    assert json.loads(manifest_path.read_text())["rows"] == 500 == original.count(b"\n") - 1

    # A failure half-way through joining the parts leaves the previous export as it was.
    real_assemble = export_mod.assemble

    def dying_assemble(parts, header, out, *encoding_and_names):
        out.write(header.encode("utf-8") + b"C999,partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(export_mod, "assemble", dying_assemble)
    scores2, _ = _frames(spark, 500, value_offset=5.0)
    with pytest.raises(OSError, match="simulated"):
        publish_export(export_rows(scores2, segments, D), D, ExportConf(), parse_destination(str(folder)))
    assert csv.read_bytes() == original
    assert sorted(p.name for p in folder.iterdir()) == [csv.name, manifest_path.name]   # no temp file left

    monkeypatch.setattr(export_mod, "assemble", real_assemble)
    second = publish_export(export_rows(scores2, segments, D), D, ExportConf(), parse_destination(str(folder)))
    assert sorted(p.name for p in folder.iterdir()) == [csv.name, manifest_path.name]
    assert csv.read_bytes() != original
    assert json.loads(manifest_path.read_text())["sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest() == second.sha256


def test_pseudonymised_ids_are_keyed_hmac_sha256(spark, monkeypatch):
    scores, segments = _frames(spark, 40)
    key = "k3y-ÄÖ-" + "x" * 80   # longer than the SHA-256 block: hashed first, as RFC 2104 says
    hashed_df = export_rows(scores, segments, D, key.encode("utf-8"))
    # the key, or its padded forms, never appear in a query plan (UI, event logs, error messages)
    plans = hashed_df._jdf.queryExecution().toString() + hashed_df._jdf.queryExecution().executedPlan().toString()
    inner, outer = export_mod.hmac_pads(key.encode("utf-8"))
    assert "k3y" not in plans
    assert not any(pad[:8].hex().upper() in plans.upper() for pad in (inner, outer))   # binary literals print as hex
    assert "SHA2" in plans.upper()   # the plan was rendered
    rows = hashed_df.collect()   # 40 rows: a test, not the pipeline
    plain = {r["customer_id"]: r for r in export_rows(scores, segments, D).collect()}
    assert len(rows) == 40
    for raw_id, row in plain.items():
        expected = hmac.new(key.encode("utf-8"), raw_id.encode("utf-8"), hashlib.sha256).hexdigest()
        hashed = next(r for r in rows if r["customer_id"] == expected)
        assert (hashed["segment"], hashed["predicted_value"]) == (row["segment"], row["predicted_value"])
    assert not set(plain) & {r["customer_id"] for r in rows}

    monkeypatch.delenv("CVSEG_TEST_HMAC", raising=False)
    with pytest.raises(ExportError, match="CVSEG_TEST_HMAC.*not set"):
        export_mod.hmac_key_from_env("CVSEG_TEST_HMAC")
    monkeypatch.setenv("CVSEG_TEST_HMAC", "secret")
    assert export_mod.hmac_key_from_env("CVSEG_TEST_HMAC") == b"secret"


def test_destination_parsing():
    assert parse_destination("s3://bucket/a/b/").prefix == "a/b/"
    assert parse_destination("s3://bucket").prefix == ""
    assert parse_destination("s3a://bucket/x").bucket == "bucket"
    with pytest.raises(ExportError, match="no bucket"):
        parse_destination("s3:///x")
    with pytest.raises(ExportError, match="local folder or s3://"):
        parse_destination("gs://bucket/x")


def test_cp932_export_with_japanese_header_and_labels_opens_in_pandas(spark, tmp_path):
    """A Japanese client's file: cp932, their own header, every segment (new and dormant too) in
    their words, the date in the file name as they write it, the value column named after the horizon."""
    import pandas as pd

    scores, segments = _frames(spark, 50)
    labels = {"top 10%": "優良", "dormant": "休眠"}
    conf = ExportConf(encoding="cp932", date_format="%Y%m%d",
                      header={"customer_id": "顧客番号", "segment": "セグメント", "predicted_value": "予測3か月価値"})
    names = export_mod.export_header(conf, horizon_months=3)
    assert names == ["顧客番号", "セグメント", "generation_id", "予測3か月価値", "p_alive"]
    result = publish_export(export_rows(scores, segments, D, labels=labels), D, conf,
                            parse_destination(str(tmp_path)), names=names, labels=labels)
    path = tmp_path / "customer_segments_20260930.csv"
    assert result.file == str(path)
    raw = path.read_bytes()
    raw.decode("cp932")                       # the whole file is cp932...
    assert "優良".encode("cp932") in raw and "優良".encode("utf-8") not in raw   # ...not UTF-8
    table = pd.read_csv(path, encoding="cp932", dtype=str, keep_default_na=False)
    assert list(table.columns) == names and len(table) == 50
    assert set(table["セグメント"]) == {"優良", "休眠", ""}     # "" = not segmented yet
    assert table.loc[table["顧客番号"] == 'C,"quoted"', "セグメント"].item() == "休眠"
    manifest = json.loads((tmp_path / "customer_segments_20260930.manifest.json").read_text())
    assert (manifest["encoding"], manifest["columns"], manifest["segment_labels"]) == ("cp932", names, labels)
    assert manifest["sha256"] == hashlib.sha256(raw).hexdigest()


def test_an_export_text_cp932_cannot_encode_fails_naming_customer_and_character(spark, tmp_path):
    scores, segments = _frames(spark, 20)
    conf = ExportConf(encoding="cp932")
    with pytest.raises(ExportError, match=r"the row of customer 'C00000002' holds '😀' \(U\+1F600\) in column "
                                          r"'segment', which cp932 cannot encode"):
        publish_export(export_rows(scores, segments, D, labels={"top 10%": "優良😀"}), D, conf,
                       parse_destination(str(tmp_path)))
    assert not list(tmp_path.glob("*.csv"))   # nothing half-written, no '?' in place of the character

    bom = ExportConf(encoding="utf-8-sig")
    publish_export(export_rows(scores, segments, D, labels={"top 10%": "優良😀"}), D, bom,
                   parse_destination(str(tmp_path)))
    raw = (tmp_path / "customer_segments_2026-09-30.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf" + HEADER.encode())   # Excel reads UTF-8 with its BOM


def test_source_id_columns_carry_each_sources_ids_plain_or_pseudonymised(spark, tmp_path):
    from pipelines.export import source_ids_by_customer

    scores, segments = _frames(spark, 4)
    identity_df = spark.createDataFrame(
        [("ec", "E7", "C00000001"), ("store", "M2", "C00000001"), ("store", "M1", "C00000001"),
         ("store", "M9", "C00000002"), ("ec", "E5", "C99999999")],      # a customer not scored as of D
        "source_name string, source_customer_id string, customer_id string")
    ids_df = source_ids_by_customer(identity_df, ["ec", "store"])
    names = export_mod.export_header(ExportConf()) + ["ec_customer_ids", "store_customer_ids"]
    folder = tmp_path / "out"
    publish_export(export_rows(scores, segments, D, source_ids_df=ids_df), D, ExportConf(),
                   parse_destination(str(folder)), names=names)
    lines = (folder / "customer_segments_2026-09-30.csv").read_text().splitlines()
    assert lines[0] == HEADER + ",ec_customer_ids,store_customer_ids"
    by_id = {line.split(",")[0]: line.split(",")[5:] for line in lines[1:] if not line.startswith('"')}
    assert by_id["C00000001"] == ["E7", "M1|M2"] and by_id["C00000002"] == ["", "M9"]
    assert by_id["C00000000"] == ["", ""] and "C99999999" not in by_id
    manifest = json.loads((folder / "customer_segments_2026-09-30.manifest.json").read_text())
    assert manifest["column_keys"][-2:] == ["ec_customer_ids", "store_customer_ids"]

    key = b"k"
    hashed = {r["customer_id"]: r for r in export_rows(scores, segments, D, key,
                                                       source_ids_df=source_ids_by_customer(identity_df, ["ec", "store"],
                                                                                            key)).collect()}
    digest = lambda text: hmac.new(key, text.encode(), hashlib.sha256).hexdigest()   # noqa: E731
    row = hashed[digest("C00000001")]
    assert (row["ec_customer_ids"], row["store_customer_ids"]) == (
        digest("E7"), "|".join(sorted([digest("M1"), digest("M2")])))
