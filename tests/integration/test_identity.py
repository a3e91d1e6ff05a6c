"""Several order sources, one customer (issue #20): normalised key matching, conflicts, stable
ids across nights, features equal to a pre-merged export, no clear-text e-mail or phone anywhere."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
import unicodedata
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from core.config import load_config
from core.tables import TABLES
from pipelines.features import run_features
from pipelines.identity import (KEY_TOO_COMMON, MAP_CONFLICT, MATCH_CONFLICT, IdentityError, IdLookup,
                                connected_components, hashed_keys, normalised_phone, nfkc, resolve)
from pipelines.sources import run_sources
from tests.integration.test_features_incremental import assert_same_features

pytestmark = pytest.mark.slow   # minutes: started first (tests/conftest.py)

KEY = "identity-test-key"
DAY = dt.date(2024, 3, 1)
HEADER = "order_id,customer_id,order_ts,gross_amount,email,phone\n"


@pytest.fixture(autouse=True)
def hmac_key(monkeypatch):
    monkeypatch.setenv("CVSEG_EXPORT_HMAC_KEY", KEY)


def _keys(spark, rows, source="ec"):
    df = spark.createDataFrame(rows, "customer_id string, email string, phone string")
    return hashed_keys(df, {"email": "email", "phone": "phone"}, source_name=source, country_code="81",
                       hmac_key=KEY.encode(), run_date=DAY)


def _ids(spark, rows):
    return spark.createDataFrame([(s, c, dt.date(2024, 1, 1) + dt.timedelta(days=i)) for i, (s, c) in enumerate(rows)],
                                 "source_name string, source_customer_id string, first_order_date date")


def _groups(map_df) -> set[frozenset]:
    by_customer: dict[str, set] = {}
    for r in map_df.collect():
        by_customer.setdefault(r.customer_id, set()).add(f"{r.source_name}:{r.source_customer_id}")
    return {frozenset(v) for v in by_customer.values()}


def test_phone_normalisation(spark):
    texts = ["090-1234-5678", "+81 90 1234 5678", "0081-90-1234-5678", "819012345678", "９０１２３４５６７８",
             "(090) 1234-5678", "+1 415 555 0100", "12-34", None]
    df = spark.createDataFrame([(t,) for t in texts], "t string")
    got = [r[0] for r in df.select(normalised_phone(nfkc(F.col("t")), "81")).collect()]
    assert got == ["819012345678"] * 6 + ["14155550100", None, None]


def _reference_key(key_type: str, raw: str) -> str | None:
    """The matching key as the module docstring states it, in plain Python (NFKC, Spark's trim of
    spaces, Java's \\s in the e-mail pattern)."""
    text = unicodedata.normalize("NFKC", raw).strip(" ")
    if key_type == "email":
        email = text.lower()
        return email if re.fullmatch(r"[^@ \t\n\x0b\f\r]+@[^@ \t\n\x0b\f\r]+\.[^@ \t\n\x0b\f\r]+", email) else None
    digits = re.sub(r"[^0-9]", "", text)
    full = (digits if text.startswith("+") else digits[2:] if digits.startswith("00")
            else "81" + digits[1:] if digits.startswith("0")
            else digits if digits.startswith("81") and len(digits) >= 11 else "81" + digits)
    return full if 8 <= len(full) <= 15 else None


def test_hashed_keys_equal_nfkc_and_hmac_in_python(spark):
    """Full-width forms take the native path, other non-ASCII text the NFKC UDF; two texts of one
    customer that normalise alike (one on each path) give one key row."""
    rows = [("C1", "ＣＵＳＴＯＭＥＲ１＠ＥＸＡＭＰＬＥ．ＪＰ\u3000", "０９０ー１１１１ー２２２２"),   # prolonged-sound mark: UDF path
            ("C1", "customer1@example.jp", "090-1111-2222"),
            ("C2", "ｶﾅ@example.jp", "+81 ９０ ３３３３ ４４４４"),       # half-width kana: NFKC makes it full-width
            ("C3", "Ｔａｒｏ＠ｅｘａｍｐｌｅ", "①②③"),                      # no dot; circled digits are not 8 digits
            ("C4", " x@y.z ", "0081-90-5555-6666")]
    expected = set()
    for customer, email, phone in rows:
        for key_type, raw in (("email", email), ("phone", phone)):
            key = _reference_key(key_type, raw)
            if key is not None:
                digest = hmac.new(KEY.encode(), f"{key_type}:{key}".encode(), hashlib.sha256).hexdigest()
                expected.add((customer, key_type, digest))
    got = [(r.source_customer_id, r.key_type, r.key_hash) for r in _keys(spark, rows).collect()]
    assert len(got) == len(set(got)) == len(expected) == 6
    assert set(got) == expected


def test_connected_components_follow_a_long_chain(spark):
    """A chain n5 - n4 - ... - n0 (each pair sharing a key) takes one round per hop for the smallest
    id to reach its end; a separate pair keeps its own label; too few rounds is an error."""
    chain = [(f"n{i}", f"k{i}") for i in range(5)] + [(f"n{i + 1}", f"k{i}") for i in range(5)]
    edges = spark.createDataFrame(chain + [("p2", "kp"), ("p1", "kp")], "node string, vertex string")
    labels_df, rounds = connected_components(edges, max_iterations=10)
    labels = {r.node: r.label for r in labels_df.collect()}
    assert labels == {**{f"n{i}": "n0" for i in range(6)}, "p1": "p1", "p2": "p1"}
    assert rounds == 6     # five hops, then the round that finds every key's holders agree
    with pytest.raises(IdentityError, match="did not settle in 3 rounds"):
        connected_components(edges, max_iterations=3)


def test_matching_links_what_it_should_and_nothing_else(spark):
    ec = _keys(spark, [("E1", "Taro.Yamada@Example.JP", None),
                       ("E2", None, "090-1111-2222"),
                       ("E3", "hanako@example.jp", "03-1234-5678"),
                       ("E4", "not an address", "090-9999-0000")])
    store = _keys(spark, [("S1", "ｔａｒｏ．ｙａｍａｄａ＠ｅｘａｍｐｌｅ．ｊｐ ", None),   # full-width, trailing space
                          ("S2", None, "+81 ９０ １１１１ ２２２２"),                    # full-width digits, +81
                          ("S3", "hanako@example.com", "03-1234-5679"),               # other domain, one digit off
                          ("S4", "not an address", None)], source="store")
    ids = _ids(spark, [("ec", "E1"), ("ec", "E2"), ("ec", "E3"), ("ec", "E4"),
                       ("store", "S1"), ("store", "S2"), ("store", "S3"), ("store", "S4")])
    result = resolve(ids, ec.unionByName(store), None, None, run_date=DAY, run_id="r1", namespaced=True,
                     max_ids_per_key=5, max_iterations=10)
    assert _groups(result.map_df) == {frozenset({"ec:E1", "store:S1"}), frozenset({"ec:E2", "store:S2"}),
                                      frozenset({"ec:E3"}), frozenset({"ec:E4"}), frozenset({"store:S3"}),
                                      frozenset({"store:S4"})}
    by_id = {r.source_customer_id: r for r in result.map_df.collect()}
    # the id with the earliest first order names the group; linked ids say how
    assert by_id["S1"].customer_id == "ec:E1" and (by_id["S1"].method, by_id["E3"].method) == ("match", "own")
    assert result.conflicts_df.count() == 0


def test_conflicts_are_reported_and_resolved_by_the_rule(spark):
    ids = _ids(spark, [("ec", "E1"), ("store", "S1"), ("ec", "E2"), ("store", "S2"), ("ec", "E5"),
                       ("ec", "P1"), ("ec", "P2"), ("ec", "P3"), ("ec", "P4")])
    client_map = spark.createDataFrame([("ec", "E1", "CRM-9"), ("ec", "E1", "CRM-3"),      # E1 claimed twice
                                        ("ec", "E2", "CRM-1"), ("store", "S2", "CRM-2")],
                                       "source_name string, source_customer_id string, customer_id string")
    keys = _keys(spark, [("E2", "same@example.jp", None), ("E5", "same@example.jp", None),
                         *[(p, None, "0120-000-000") for p in ("P1", "P2", "P3", "P4")]])   # a shop's number
    keys = keys.unionByName(_keys(spark, [("S2", "same@example.jp", None)], source="store"))
    result = resolve(ids, keys, client_map, None, run_date=DAY, run_id="r1", namespaced=True,
                     max_ids_per_key=3, max_iterations=10)
    conflicts = {(r.reason, r.source_customer_id): r for r in result.conflicts_df.collect()}
    assert set(conflicts) == {(MAP_CONFLICT, "E1"), (MATCH_CONFLICT, "E5"), (KEY_TOO_COMMON, None)}
    assert conflicts[(MAP_CONFLICT, "E1")].candidates == ["CRM-3", "CRM-9"]
    assert conflicts[(MATCH_CONFLICT, "E5")].candidates == ["CRM-1", "CRM-2"]
    assert conflicts[(KEY_TOO_COMMON, None)].candidates == ["ec:P1", "ec:P2", "ec:P3", "ec:P4"]
    unified = {r.source_customer_id: (r.customer_id, r.method) for r in result.map_df.collect()}
    assert unified["E1"] == ("CRM-3", "map")              # no earlier id: the smallest
    assert unified["E2"] == ("CRM-1", "map") and unified["S2"] == ("CRM-2", "map")   # the map wins
    assert unified["E5"] == ("ec:E5", "own")              # not linked to either
    assert [unified[p] for p in ("P1", "P4")] == [("ec:P1", "own"), ("ec:P4", "own")]
    # with an earlier assignment the map conflict keeps it
    previous = spark.createDataFrame([("ec", "E1", "CRM-9", "map", DAY, DAY, "r0")], result.map_df.drop("_previous").schema)
    again = resolve(ids, keys, client_map, previous, run_date=DAY, run_id="r2", namespaced=True,
                    max_ids_per_key=3, max_iterations=10)
    assert {r.source_customer_id: r.customer_id for r in again.map_df.collect()}["E1"] == "CRM-9"


def test_ids_that_no_longer_link_keep_or_give_back_their_own_ids(spark):
    """Keys that linked two ids are gone (rewritten): each id is on its own again. The id whose own
    id the customer had keeps it; the other takes its own (never two customers on one id)."""
    from core.tables import IDENTITY_MAP

    earlier = dt.date(2024, 1, 1)
    previous = spark.createDataFrame(
        [("ec", "E1", "ec:E1", "own", earlier, earlier, "r0"), ("store", "S1", "ec:E1", "match", earlier, earlier, "r0"),
         ("store", "S7", "store:S7", "own", earlier, earlier, "r0"), ("ec", "E7", "store:S7", "match", earlier, earlier, "r0")],
        IDENTITY_MAP.schema)
    ids = _ids(spark, [("ec", "E1"), ("store", "S1"), ("store", "S7"), ("ec", "E7"), ("ec", "N1")])
    result = resolve(ids, None, None, previous, run_date=DAY, run_id="r1", namespaced=True, max_ids_per_key=3,
                     max_iterations=10)
    unified = {(r.source_name, r.source_customer_id): (r.customer_id, r.method, r.assigned_on)
               for r in result.map_df.collect()}
    assert unified == {("ec", "E1"): ("ec:E1", "own", earlier), ("store", "S1"): ("store:S1", "own", DAY),
                       ("store", "S7"): ("store:S7", "own", earlier), ("ec", "E7"): ("ec:E7", "own", DAY),
                       ("ec", "N1"): ("ec:N1", "own", DAY)}
    assert result.conflicts_df.count() == 0


def _write(folder: Path, name: str, rows: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")


def _conf(tmp_path, warehouse, identity="{match_on: [email, phone]}"):
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"""
storage: {{warehouse: {warehouse}}}
source: {{columns: {{email: email, phone: phone}}}}
sources:
  - {{name: ec, path: {tmp_path / 'ec'}}}
  - {{name: store, path: {tmp_path / 'store'}, channel: store}}
identity: {identity}
validation: {{future_cutoff: 2024-12-31}}
features: {{full_every_days: 30}}
""", encoding="utf-8")
    return load_config(conf)


def test_unified_ids_are_stable_when_a_later_night_adds_a_link(spark, storage, tmp_path, warehouse, caplog):
    caplog.set_level(logging.INFO)
    config = _conf(tmp_path, warehouse)
    # night 1: a store member; night 2: an EC customer with no key in common yet, bought earlier
    # (eight more members: an update from the previous night recomputes at most 30% of customers)
    _write(tmp_path / "store", "d1.csv", ["S-1,M1,2024-01-20 10:00:00,3000,,090-1234-5678"]
           + [f"S-{i},M{i},2024-01-1{i} 10:00:00,100,," for i in range(2, 10)])
    _write(tmp_path / "ec", "d1.csv", ["W-1,X7,2024-01-21 10:00:00,1000,other@example.jp,"])
    run_sources(spark, storage, config, dt.date(2024, 1, 21))
    run_features(storage, dt.date(2024, 1, 21), config.features)
    _write(tmp_path / "ec", "d2.csv", ["W-2,E9,2024-01-05 09:00:00,5000,E9@example.jp,"])
    night = run_sources(spark, storage, config, dt.date(2024, 1, 22))
    assert (night.identity.mode, night.identity.write_mode) == ("incremental", "append")
    first = {r.source_customer_id: r.customer_id for r in storage.read("identity_map").collect()}
    assert {k: first[k] for k in ("M1", "X7", "E9")} == {"M1": "store:M1", "X7": "ec:X7", "E9": "ec:E9"}
    stats = run_features(storage, dt.date(2024, 1, 22), config.features)
    assert stats.mode == "incremental", stats             # only a new id: appended, nothing moved
    # the update (which unifies only the orders it reads) equals a full computation on the unified ids
    from pipelines.features import build_customer_features
    from pipelines.identity import read_orders
    assert_same_features(storage.read("customer_features").where(F.col("as_of_date") == dt.date(2024, 1, 22)),
                         build_customer_features(read_orders(storage), dt.date(2024, 1, 22)))
    # night 3: E9 buys again, now with M1's phone written another way: E9 joins the older M1
    _write(tmp_path / "ec", "d3.csv", ["W-3,E9,2024-01-23 09:00:00,2000,,+81 ９０-１２３４-５６７８"])
    result = run_sources(spark, storage, config, dt.date(2024, 1, 23))
    assert (result.identity.reassigned_source_ids, result.identity.write_mode) == (1, "overwrite")
    assert result.identity.mode == "full" and "a merge" in result.identity.full_reason
    rows = {r.source_customer_id: r for r in storage.read("identity_map").collect()}
    assert {k: rows[k].customer_id for k in ("M1", "X7", "E9", "M2")} == {
        "M1": "store:M1", "X7": "ec:X7", "E9": "store:M1", "M2": "store:M2"}
    assert (rows["E9"].first_seen, rows["E9"].assigned_on, rows["M1"].assigned_on) == (
        dt.date(2024, 1, 22), dt.date(2024, 1, 23), dt.date(2024, 1, 21))
    stats = run_features(storage, dt.date(2024, 1, 23), config.features)
    assert stats.mode == "full" and "identity_map" in stats.full_reason
    features = {r.customer_id: r for r in storage.read("customer_features")
                .where(F.col("as_of_date") == dt.date(2024, 1, 23)).collect()}
    merged = features["store:M1"]
    assert (merged.n_orders, merged.first_order_date, merged.acquisition_channel, merged.gross_amount) == (
        3, dt.date(2024, 1, 5), None, 10000.0)
    # re-running the same night changes nothing
    again = run_sources(spark, storage, config, dt.date(2024, 1, 23))
    assert (again.identity.write_mode, again.identity.mode) == ("unchanged", "incremental")
    _assert_no_clear_keys(storage, caplog.text, ["example.jp", "090-1234", "１２３４", "+81"])


def test_a_night_resolves_only_its_new_ids_as_a_full_resolution_would(spark, storage, tmp_path, warehouse,
                                                                        monkeypatch):
    config = _conf(tmp_path, warehouse, "{match_on: [email, phone], max_ids_per_key: 3}")
    ec, store = tmp_path / "ec", tmp_path / "store"
    _write(store, "d1.csv", ["S-1,M1,2024-01-10 10:00:00,100,,090-1111-1111", "S-2,M2,2024-01-11 10:00:00,100,,"])
    _write(ec, "d1.csv", ["W-1,X1,2024-01-12 10:00:00,100,x1@example.jp,"]
           + [f"W-{i},X{i},2024-01-1{i} 10:00:00,100,,0120-000-000" for i in range(2, 6)])   # a shop's phone
    assert run_sources(spark, storage, config, dt.date(2024, 1, 21)).identity.mode == "full"
    _write(ec, "d2.csv", ["W-10,E1,2024-01-22 09:00:00,100,,+81 90 1111 1111",   # joins the store's M1
                          "W-11,E2,2024-01-22 09:00:00,100,PAIR@example.jp,",      # with N1: both new
                          "W-12,X6,2024-01-22 09:00:00,100,,0120-000-000",         # the shop's phone again
                          "W-13,X1,2024-01-22 09:00:00,100,,03-5555-5555",         # a known id, a new key
                          "W-14,X1,2024-01-22 10:00:00,100,x1@example.jp,"])       # a known id, a stored key
    _write(store, "d2.csv", ["S-10,N1,2024-01-02 09:00:00,100,pair@example.jp,"])
    # the run stops after both sources' orders are committed, before their keys are compared: no
    # key, file or run of the night is recorded, so the next run reads the files again
    import pipelines.identity
    import pipelines.sources
    keys_before, files_before = storage.read("identity_keys").count(), storage.read("ingested_files").count()
    with monkeypatch.context() as patch:
        patch.setattr(pipelines.sources, "add_keys", _crash)
        with pytest.raises(RuntimeError, match="crash"):
            run_sources(spark, storage, config, dt.date(2024, 1, 22))
    assert (storage.read("identity_keys").count(), storage.read("ingested_files").count()) == (keys_before,
                                                                                                files_before)
    # the night: the identity step takes the new keys' holders from the ingest's scan of identity_keys
    holders_given = []
    resolve_new_ids = pipelines.identity.resolve_new_ids
    monkeypatch.setattr(pipelines.identity, "resolve_new_ids", lambda *a, **k: holders_given.append(
        k["known_holders_df"] is not None) or resolve_new_ids(*a, **k))
    night = run_sources(spark, storage, config, dt.date(2024, 1, 22)).identity
    assert (night.mode, night.write_mode, night.new_source_ids, night.reassigned_source_ids) == (
        "incremental", "append", 4, 0)
    assert holders_given == [True]
    stored = {(r.source_name, r.source_customer_id): (r.customer_id, r.method)
              for r in storage.read("identity_map").collect()}
    assert {k: stored[k] for k in [("ec", "E1"), ("ec", "E2"), ("store", "N1"), ("ec", "X6"), ("store", "M1")]} == {
        ("ec", "E1"): ("store:M1", "match"), ("ec", "E2"): ("store:N1", "match"),
        ("store", "N1"): ("store:N1", "own"), ("ec", "X6"): ("ec:X6", "own"), ("store", "M1"): ("store:M1", "own")}
    # a key already stored for its source id is not appended again
    keys = [(r.source_name, r.source_customer_id, r.key_type, r.key_hash) for r in storage.read("identity_keys").collect()]
    assert len(keys) == len(set(keys)) and sum(k[1] == "X1" for k in keys) == 2
    conflicts = storage.read("identity_conflicts").where(F.col("run_date") == dt.date(2024, 1, 22)).collect()
    assert [(r.reason, r.candidates) for r in conflicts] == [(KEY_TOO_COMMON, [f"ec:X{i}" for i in range(2, 7)])]
    # the summary's totals, kept without reading the whole map, are those of the table
    assert (night.source_ids, night.customers, night.linked_source_ids) == (
        len(stored), len({c for c, _ in stored.values()}), sum(m != "own" for _, m in stored.values()))

    # resolving every id again from the same tables gives the same ids and methods
    from core.tables import IDENTITY_KEYS, ORDERS
    from pipelines.identity import resolve, source_customer_ids
    full = resolve(source_customer_ids(storage.read(ORDERS.name)), storage.read(IDENTITY_KEYS.name), None,
                   storage.read("identity_map"), run_date=dt.date(2024, 1, 22), run_id="check", namespaced=True,
                   max_ids_per_key=3, max_iterations=10)
    assert {(r.source_name, r.source_customer_id): (r.customer_id, r.method) for r in full.map_df.collect()} == stored

    # a key that linked two ids and is now held by four links nobody: every id is resolved again
    _write(ec, "d3.csv", ["W-20,E3,2024-01-23 09:00:00,100,pair@example.jp,",
                          "W-21,E4,2024-01-23 09:00:00,100,pair@example.jp,"])
    night = run_sources(spark, storage, config, dt.date(2024, 1, 23)).identity
    assert night.mode == "full" and "now held by more than 3" in night.full_reason, night
    # so do other identity settings than the last run's
    from pipelines.identity import identity_version, incremental_inputs
    assert not isinstance(incremental_inputs(storage, config.identity, identity_version(storage)), str)
    changed = config.identity.model_copy(update={"max_ids_per_key": 4})
    assert "identity settings changed" in incremental_inputs(storage, changed, identity_version(storage))


def _crash(*_args, **_kwargs):
    raise RuntimeError("crash")


#: a random UUID (Spark's part file names in source_file, run ids): "...-3090-4360-..." holds "090-"
UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _assert_no_clear_keys(storage, log_text: str, needles: list[str]) -> None:
    for name in TABLES:
        if not storage.exists(name):
            continue
        df = storage.read(name)
        text = F.regexp_replace(F.lower(F.to_json(F.struct(*[F.col(c) for c in df.columns]))), UUID, "<uuid>")
        found = F.lit(False)
        for needle in needles:
            found = found | text.contains(needle.lower())
        hits = df.where(found).limit(3).collect()
        assert not hits, f"clear text in {name}: {hits}"
    log_text = re.sub(UUID, "<uuid>", log_text.lower())
    assert not any(n.lower() in log_text for n in needles)


def test_two_sources_give_the_features_of_one_premerged_export(spark, tmp_path, caplog):
    from core.storage import Storage
    from datagen.generate import generate_sources
    from pipelines.trends import run_trends

    caplog.set_level(logging.INFO)
    end = dt.date(2026, 9, 30)
    gen = generate_sources(spark, 400, 5, end, str(tmp_path / "gen"), overlap=0.3)
    config = load_config(gen["conf_path"], [f"storage.warehouse={tmp_path / 'multi'}",
                                            f"validation.future_cutoff={end}"])
    multi = Storage(spark, str(tmp_path / "multi"), backend="delta-spark")
    result = run_sources(spark, multi, config, end)
    run_features(multi, end, config.features)

    # the same orders as one export on the generator's own ids (the store's channel written in)
    truth = spark.read.option("header", True).csv(gen["identity_truth_path"])
    parts = []
    for name in gen["sources"]:
        part = spark.read.option("header", True).csv(gen["paths"][name])
        if "channel" not in part.columns:
            part = part.withColumn("channel", F.lit(name))
        parts.append(part.join(truth.where(F.col("source_name") == name)
                               .select(F.col("source_customer_id").alias("customer_id"), F.col("customer_id").alias("_t")),
                               on="customer_id", how="inner")
                     .withColumn("customer_id", F.col("_t")).drop("_t", "email", "phone"))
    parts[0].unionByName(parts[1]).coalesce(1).write.option("header", True).csv(str(tmp_path / "merged"))
    single_conf = load_config(gen["conf_path"], [f"storage.warehouse={tmp_path / 'single'}", "sources=[]",
                                                 "identity.match_on=[]", "source.columns.email=null",
                                                 "source.columns.phone=null", "source.columns.channel=channel",
                                                 f"source.path={tmp_path / 'merged'}", f"validation.future_cutoff={end}"])
    single = Storage(spark, str(tmp_path / "single"), backend="delta-spark")
    run_sources(spark, single, single_conf, end)
    run_features(single, end, single_conf.features)
    assert not single.exists("identity_map")                # one source, no identity config: no identity step

    to_truth = (multi.read("identity_map").join(
        truth.select("source_name", "source_customer_id", F.col("customer_id").alias("_t")),
        on=["source_name", "source_customer_id"], how="inner")
        .groupBy("customer_id").agg(F.collect_set("_t").alias("_t")))
    assert to_truth.where(F.size("_t") != 1).count() == 0   # no unified customer mixes two people
    multi_df = (multi.read("customer_features").join(to_truth, on="customer_id", how="inner")
                .withColumn("customer_id", F.col("_t")[0]).drop("_t"))
    single_df = single.read("customer_features")
    assert result.identity.customers == single_df.count() == multi_df.count() == 400
    # a pre-merged export has lost which source each order came from: everything else must agree
    columns = sorted(set(single_df.columns) - {"first_source", "source_set"})
    assert single_df.where(F.col("source_set") != "default").count() == 0
    pd.testing.assert_frame_equal(   # sums of the same amounts in another order: equal to the last bits or so
        multi_df.select(*columns).toPandas().sort_values("customer_id").reset_index(drop=True),
        single_df.select(*columns).toPandas().sort_values("customer_id").reset_index(drop=True),
        check_exact=False, rtol=1e-9)

    # the channel-set trend: customers who bought in both sources, counted from the exports themselves
    run_trends(multi, end, config.trends)
    both = (parts[0].select("customer_id").distinct().join(parts[1].select("customer_id").distinct(),
                                                           on="customer_id", how="inner").count())
    assert multi_df.where(F.col("source_set") == "ec+store").count() == both
    yearly = multi.read("trend_channel_sets").where(F.col("period") == "year")
    assert yearly.agg(F.sum("customers")).first()[0] == 400
    assert yearly.where(F.col("source_set") == "ec+store").agg(F.sum("customers")).first()[0] == both > 0
    _assert_no_clear_keys(multi, caplog.text + str(result), ["example.jp", "customer1@", "090-"])

    # features written before the source columns: the channel sets are not written with null sources
    from pipelines.trends import TrendsError
    old_df = multi.read("customer_features").withColumn("first_source", F.lit(None).cast("string"))
    multi.replace_partitions("customer_features", old_df, partitions={"as_of_date": [end]})
    with pytest.raises(TrendsError, match=r"run `cvseg features --as-of 2026-09-30` again"):
        run_trends(multi, end, config.trends, rebuild=True)


def test_the_client_map_is_read_from_csv_parquet_delta_or_a_table(spark, tmp_path):
    from pipelines.identity import IdentityError, read_client_map

    rows = [("ec", " E1", "CRM-1"), ("store", "S1", "CRM-1"), ("ec", "E2", "")]   # an empty customer: no link
    df = spark.createDataFrame(rows, "source_name string, source_customer_id string, customer_id string")
    df.coalesce(1).write.option("header", True).csv(str(tmp_path / "map_csv"))
    df.write.parquet(str(tmp_path / "map_parquet"))
    df.write.format("delta").save(str(tmp_path / "map_delta"))
    df.createOrReplaceTempView("crm_ids")
    expected = [("ec", "E1", "CRM-1"), ("store", "S1", "CRM-1")]
    for fmt, where in (("csv", "map_csv"), ("parquet", "map_parquet"), ("delta", "map_delta"), ("table", None)):
        got = read_client_map(spark, str(tmp_path / where) if where else "crm_ids", ["ec", "store"], fmt)
        assert sorted(tuple(r) for r in got.collect()) == expected, fmt
    with pytest.raises(IdentityError, match=r"cannot read .*map_csv as delta .*identity.map_format"):
        read_client_map(spark, str(tmp_path / "map_csv"), ["ec", "store"], "delta")
    with pytest.raises(IdentityError, match=r"source_name \['ec'\] is not a configured source \(\['web', 'store'\]\)"):
        read_client_map(spark, str(tmp_path / "map_parquet"), ["web", "store"], "parquet")


@pytest.mark.parametrize("namespaced", [True, False])
@pytest.mark.parametrize("broadcast_max", [1_000_000, 0])
def test_orders_read_through_the_linked_ids_only_equal_the_join_with_the_whole_map(spark, monkeypatch, namespaced,
                                                                                   broadcast_max):
    """Every later stage reads orders on the unified id by looking up only the ids not on their own
    id: the same ids as the join of every order with the whole map, broadcast or not."""
    import pipelines.identity as identity

    monkeypatch.setattr(identity, "UNIFY_BROADCAST_MAX", broadcast_max)
    own = (lambda s, c: f"{s}:{c}") if namespaced else (lambda s, c: c)
    map_rows = [("ec", "E1", own("ec", "E1"), "own"), ("store", "S1", own("ec", "E1"), "match"),
                ("ec", "E2", own("ec", "E2"), "own"), ("store", "S2", "CRM-9", "map"),
                ("ec", "E3", "CRM-9", "map"), ("store", "E1", own("store", "E1"), "own"),   # same id, other source
                ("default", "D1", own("default", "D1"), "own")]
    identity_df = spark.createDataFrame(map_rows, "source_name string, source_customer_id string, customer_id string, "
                                                  "method string")
    orders = [("o1", "ec", "E1"), ("o2", "store", "S1"), ("o3", "ec", "E2"), ("o4", "store", "S2"),
              ("o5", "ec", "E3"), ("o6", "store", "E1"), ("o7", None, "D1"), ("o8", "ec", "E1")]
    orders_df = spark.createDataFrame(orders, "order_id string, source_name string, customer_id string")
    lookup = IdLookup.of(identity_df, materialise=True)
    assert lookup.broadcast == (broadcast_max > 0) and lookup.namespaced == namespaced
    got = {r.order_id: r.customer_id for r in lookup.apply(orders_df).collect()}
    # the reference: every order joined with the whole map
    whole_df = orders_df.withColumn("source_name", F.coalesce("source_name", F.lit("default"))).join(
        identity_df.withColumnRenamed("customer_id", "unified").withColumnRenamed("source_customer_id", "customer_id"),
        on=["source_name", "customer_id"], how="left")
    assert got == {r.order_id: r.unified for r in whole_df.collect()}
    assert got["o2"] == got["o1"] == own("ec", "E1") and got["o4"] == got["o5"] == "CRM-9"
    assert got["o6"] == own("store", "E1") and got["o7"] == own("default", "D1")
    # store:S1 reads like S1's own id, but S1 is on ec:E1's: its orders are not that customer's
    touched_df = spark.createDataFrame([("CRM-9",), (own("ec", "E2"),), (own("store", "S1"),)], "customer_id string")
    assert sorted(r.order_id for r in lookup.orders_of(orders_df, touched_df).collect()) == ["o3", "o4", "o5"]
    # a source id the map does not hold yet is on its own id as well
    stray_df = spark.createDataFrame([("o9", "store", "S7")], "order_id string, source_name string, customer_id string")
    assert lookup.apply(stray_df).first().customer_id == own("store", "S7")


def test_the_omni_demo_keeps_email_and_phone_out_of_tables_logs_mlflow_and_export(spark, tmp_path, caplog, capsys,
                                                                                 monkeypatch):
    """`cvseg demo --dataset omni`: the whole night on two generated sources; the clear keys appear
    nowhere it writes or prints."""
    from core.storage import Storage
    from jobs.cli import main

    monkeypatch.delenv("CVSEG_EXPORT_HMAC_KEY")     # the demo brings its own key for sample data
    caplog.set_level(logging.INFO)
    root = tmp_path / "demo"
    assert main(["demo", "--dataset", "omni", "--dir", str(root), "--customers", "300",
                 "--set", "spark.master=null", "--set", "models.purchase_models=[bgnbd]",
                 "--set", "models.purchase_basis=gross", "--set", "models.hybrid.enabled=false",
                 "--set", "storage.backend=delta-spark"]) == 0
    out = capsys.readouterr().out
    assert "6 step(s) ran, 0 skipped" in out and "customers bought in both" in out
    assert "identity identity-" in out or "source ids ->" in out, out

    storage = Storage(spark, str(root / "warehouse"), backend="delta-spark")
    assert storage.read("identity_map").where(F.col("method") == "match").count() > 0
    needles = ["example.jp", "customer1@", "090-", "+81", "９０"]
    _assert_no_clear_keys(storage, caplog.text + out, needles)
    written = [p for p in (root / "warehouse").rglob("*") if p.is_file() and "_delta_log" not in p.parts
               and p.suffix != ".parquet"]               # tables were checked above, by value
    written += list((root / "exports").rglob("*"))
    assert any(p.name == "mlflow.db" for p in written) and any("mlflow-artifacts" in p.parts for p in written)
    for path in written:
        if path.is_file():
            data = path.read_bytes().lower()
            assert not [n for n in needles if n.lower().encode() in data], path
    export = next((root / "exports").glob("*.csv")).read_text().splitlines()
    assert export[0].endswith(",ec_customer_ids,store_customer_ids") and len(export) > 300 * 0.7

    # a new user types the printed key line, then a printed command: it finds the key and changes nothing
    from jobs.demo import DEMO_HMAC_KEY
    assert f"export CVSEG_EXPORT_HMAC_KEY={DEMO_HMAC_KEY}" in out
    monkeypatch.setenv("CVSEG_EXPORT_HMAC_KEY", DEMO_HMAC_KEY)
    assert main(["run", "--conf", str(root / "conf.yaml"), "--as-of", "2026-09-30"]) == 0
    assert "0 step(s) ran, 7 skipped" in capsys.readouterr().out
