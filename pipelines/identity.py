"""Identity: one customer across several order sources (an EC shop and store POS exports).

``orders.customer_id`` is always the id a source gave its customer. This stage decides which
source ids are one person and gives each source id a **unified** ``customer_id`` in the table
``identity_map``; every later stage reads orders through it (:func:`read_orders`), so features,
scores, segments, trends and the export run on the unified id.

Links come from
* the client's own map (``identity.map``: a CSV of source_name, source_customer_id, customer_id,
  e.g. from their CRM), and/or
* matching keys (``identity.match_on: [email, phone]``), read at ingest from the mapped columns,
  normalised (Unicode NFKC, trimmed, lower-case e-mail; phone: digits only with the country
  calling code, a national number's trunk 0 replaced by ``identity.phone_country_code``) and
  HMAC-SHA256-hashed with the export's key (``export.hmac_key_env``) in the same query that reads
  them: only hashes reach a table (``identity_keys``), never the text.

Source ids sharing a key or a mapped customer are one customer: the connected components of the
graph source id - key / mapped customer, found by min-label propagation in Spark (a few rounds,
each two joins over the edges; nothing customer-sized reaches the driver).

The unified id of a component (the rule, in order):
1. a mapped customer id (the client's CRM decides);
2. otherwise the unified id its members already had that was first seen earliest (then: earliest
   first order, then the smallest id): ids are stable across nights, and a new link merges the
   newer customer into the older one;
3. a component of new source ids only: the source id (``<source>:<id>`` with several sources)
   whose first order is earliest (then the smallest).

Conflicts (table ``identity_conflicts``, never silent):
* ``map_conflict``: the map gives one source id two customers -> it keeps the one it had, else the
  smallest id;
* ``match_conflict``: matching keys join source ids the map gives to different customers -> the
  map wins: mapped ids keep their customer, the unmapped ids of that component stay on their own;
* ``key_too_common``: a key shared by more than ``identity.max_ids_per_key`` source ids (a shop's
  phone, a placeholder e-mail) links nobody.

With a lone source and no ``identity`` config this stage does not run and no table is written:
orders are read as they are.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import Config, IdentityConf
from core.errors import UserError
from core.storage import Storage
from core.tables import IDENTITY_CONFLICTS, IDENTITY_KEYS, IDENTITY_MAP, IDENTITY_RUNS, ORDERS
from pipelines.export import hmac_key_from_env, hmac_sha256_hex, with_hmac_pads

log = logging.getLogger(__name__)

KEY_TYPES = ("email", "phone")
METHOD_OWN, METHOD_MAP, METHOD_MATCH = "own", "map", "match"
MAP_CONFLICT, MATCH_CONFLICT, KEY_TOO_COMMON = "map_conflict", "match_conflict", "key_too_common"
#: orders written before sources existed (null source_name) belong to the lone source's name
LEGACY_SOURCE_NAME = "default"
MAP_COLUMNS = ("source_name", "source_customer_id", "customer_id")
_SEP = "\u001f"      # joins source name and id into one node id: a character no id holds
#: NFKC of each full-width ASCII form (U+FF01-FF5E) and of the ideographic space is one ASCII character
_FULL_WIDTH = "\u3000" + "".join(chr(c) for c in range(0xFF01, 0xFF5F))
_HALF_WIDTH = " " + "".join(chr(c) for c in range(0x21, 0x7F))


class IdentityError(UserError, ValueError):
    """The identity step cannot run as configured; the message says what to fix."""


# --------------------------------------------------------------------------------------------
# Column functions: normalised matching keys
# --------------------------------------------------------------------------------------------
@F.pandas_udf(T.StringType())   # a type object, not a DDL string: no session needed at import
def nfkc(text: pd.Series) -> pd.Series:
    """Unicode NFKC (full-width letters and digits -> ASCII, ｶﾅ -> カナ); Spark has no native one.
    Applied to distinct (customer, key) pairs only, not to every order row."""
    return text.map(lambda v: None if v is None else unicodedata.normalize("NFKC", v))


def normalised_email(text: Column) -> Column:
    """NFKC'd text -> trimmed, lower-case e-mail; null unless it looks like one (x@y.z)."""
    return _email_key(F.trim(text))


def normalised_phone(text: Column, country_code: str) -> Column:
    """NFKC'd text -> the digits of the number with its country calling code (E.164 without +);
    null unless 8 to 15 digits. ``+81 90-1234-5678``, ``0081 90...``, ``090-1234-5678`` (national:
    trunk 0 -> ``country_code``) and ``819012345678`` give the same key."""
    trimmed = F.trim(text)
    return _phone_key(trimmed, _digits_of(trimmed), country_code)


def _email_key(trimmed: Column) -> Column:
    email = F.lower(trimmed)
    return F.when(email.rlike(r"^[^@\s]+@[^@\s]+\.[^@\s]+$"), email)


def _digits_of(trimmed: Column) -> Column:
    return F.regexp_replace(trimmed, r"[^0-9]", "")


def _phone_key(trimmed: Column, digits: Column, country_code: str) -> Column:
    """The phone key from the trimmed text and its digits. Both are read many times below: pass
    columns (computed once), not expressions, where rows are many."""
    full = (F.when(trimmed.startswith("+"), digits)
            .when(digits.startswith("00"), F.substring(digits, 3, 64))
            .when(digits.startswith("0"), F.concat(F.lit(country_code), F.substring(digits, 2, 64)))
            .when(digits.startswith(country_code) & (F.length(digits) >= 11), digits)
            .otherwise(F.concat(F.lit(country_code), digits)))
    return F.when(F.length(full).between(8, 15), full)


def _with_key_parts(df: DataFrame, text: Column) -> DataFrame:
    """``_trimmed`` and a phone's ``_digits`` (null for other key types) of the NFKC'd ``text``."""
    return (df.withColumn("_trimmed", F.trim(text))
            .withColumn("_digits", F.when(F.col("key_type") == "phone", _digits_of(F.col("_trimmed")))))


def order_source(orders_df: DataFrame) -> Column:
    """An order's source name: :data:`LEGACY_SOURCE_NAME` where it has none (rows, or a whole
    orders frame, from before sources had names)."""
    if "source_name" not in orders_df.columns:
        return F.lit(LEGACY_SOURCE_NAME)
    return F.coalesce(F.col("source_name"), F.lit(LEGACY_SOURCE_NAME))


def id_method(map_id: Column, customer_id: Column, own_id: Column) -> Column:
    """How a source id got its unified id: ``map`` (the client's map), ``own`` (its own id: linked
    to nobody, or the id the others of its customer took) or ``match`` (another id's, by shared
    keys). A source id keeps its method when later ids join its customer, so nights that only add
    ids only append to ``identity_map``."""
    return (F.when(map_id.isNotNull(), F.lit(METHOD_MAP))
            .when(customer_id == own_id, F.lit(METHOD_OWN)).otherwise(F.lit(METHOD_MATCH)))


def node_id(source_name: Column, source_customer_id: Column) -> Column:
    return F.concat(source_name, F.lit(_SEP), source_customer_id)


def key_vertex(key_type: Column, key_hash: Column) -> Column:
    """The graph vertex of a matching key (prefix ``k``: never equal to a map vertex)."""
    return F.concat(F.lit("k"), key_type, F.lit(_SEP), key_hash)


def map_vertex(map_id: Column) -> Column:
    """The graph vertex of a customer in the client's map (prefix ``m``)."""
    return F.concat(F.lit("m"), F.lit(_SEP), map_id)


def own_customer_id(source_name: Column, source_customer_id: Column, namespaced: bool) -> Column:
    """The unified id of a source id linked to nobody: its own id, ``<source>:<id>`` with several
    sources (their ids collide: EC customer 123 is not store member 123)."""
    return F.concat(source_name, F.lit(":"), source_customer_id) if namespaced else source_customer_id


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------
def hashed_keys(df: DataFrame, key_columns: dict[str, str], *, source_name: str, country_code: str,
                hmac_key: bytes, run_date: dt.date) -> DataFrame:
    """IDENTITY_KEYS rows from ``df`` (``customer_id`` and the clear key columns named in
    ``key_columns``: key type -> column). The clear text lives only inside this query: what
    leaves it is the HMAC of ``<key type>:<normalised key>``."""
    if not key_columns:
        raise ValueError("key_columns is empty")
    # one scan of the rows for every key type (a union of one select per type would read them twice)
    pairs = F.array(*[F.struct(F.lit(key_type).alias("key_type"), F.col(column).alias("_raw"))
                      for key_type, column in key_columns.items()])
    pairs_df = (df.select(F.col("customer_id"), F.inline(pairs))
                .where(F.col("_raw").isNotNull() & F.col("customer_id").isNotNull()))
    # NFKC leaves ASCII as it is, and full-width forms become their ASCII letters (a native
    # translate, char by char as NFKC does: a Japanese export's full-width phone digits need no
    # Python): only what is still not ASCII goes through the Python UDF (a Spark condition does not
    # keep a UDF from running on every row, a filter does). The trimmed text and a phone's digits
    # are computed before the checkpoint: the filter on the key below is pushed down and would
    # otherwise repeat the regular expressions once per use.
    distinct_df = (pairs_df.distinct().withColumn("_narrow", F.translate("_raw", _FULL_WIDTH, _HALF_WIDTH))
                   .withColumn("_ascii", ~F.col("_narrow").rlike("[^\\x00-\\x7F]"))
                   .transform(_with_key_parts, F.col("_narrow"))
                   .localCheckpoint())   # read once: both branches below use it
    parts = ["customer_id", "key_type", "_trimmed", "_digits"]
    keyed_df = (distinct_df.where(F.col("_ascii")).select(*parts)
                .unionByName(distinct_df.where(~F.col("_ascii")).drop("_trimmed", "_digits")
                             .transform(_with_key_parts, nfkc(F.col("_raw"))).select(*parts))
                .withColumn("_key", F.when(F.col("key_type") == "email", _email_key(F.col("_trimmed")))
                            .otherwise(_phone_key(F.col("_trimmed"), F.col("_digits"), country_code)))
                .where(F.col("_key").isNotNull())
                .select("customer_id", "key_type", "_key").distinct()   # two texts can give one key
                .transform(with_hmac_pads, hmac_key))
    key_hash = hmac_sha256_hex(F.concat(F.col("key_type"), F.lit(":"), F.col("_key")),
                               F.col("_hmac_inner"), F.col("_hmac_outer"))
    return (keyed_df.select(F.lit(source_name).alias("source_name"), F.col("customer_id").alias("source_customer_id"),
                            "key_type", key_hash.alias("key_hash"), F.lit(run_date).alias("first_seen")))


def connected_components(edges_df: DataFrame, max_iterations: int) -> tuple[DataFrame, int]:
    """(node, label) for every node of the bipartite ``edges_df`` (node, vertex): the label is the
    smallest node id of the node's component. Min-label propagation: each round a vertex takes the
    smallest label of its nodes and a node the smallest of its vertices', starting from each node's
    own id (so the first round needs no labels to join); it stops when every vertex's nodes carry
    one label. A node's label is then its component's smallest node: it is a node of the component,
    never above the node's own id, and one for the whole component. Each round is checkpointed (its
    lineage would otherwise grow with the rounds); the check is one aggregate, not another round."""
    labels_df = _offered_labels(edges_df, edges_df.groupBy("vertex").agg(F.min("node").alias("vertex_label")))
    for round_no in range(2, max_iterations + 1):
        vertex_df = (edges_df.join(labels_df, on="node", how="inner").groupBy("vertex")
                     .agg(F.min("label").alias("vertex_label"), F.max("label").alias("_highest")))
        if not vertex_df.where(F.col("vertex_label") != F.col("_highest")).limit(1).count():
            return labels_df, round_no
        labels_df = _offered_labels(edges_df, vertex_df.drop("_highest"))
    raise IdentityError(f"the identity graph did not settle in {max_iterations} rounds of label propagation "
                        "(a very long chain of shared keys); raise identity.max_iterations")


def _offered_labels(edges_df: DataFrame, vertex_df: DataFrame) -> DataFrame:
    """(node, label): the smallest ``vertex_label`` of the node's vertices (its own label is among
    them, so it never rises)."""
    return (edges_df.join(vertex_df, on="vertex", how="inner")
            .groupBy("node").agg(F.min("vertex_label").alias("label")).localCheckpoint())


@dataclass(frozen=True)
class Resolution:
    map_df: DataFrame            # IDENTITY_MAP rows plus _previous (the earlier customer_id, or null)
    conflicts_df: DataFrame      # IDENTITY_CONFLICTS rows
    iterations: int


def resolve(source_ids_df: DataFrame, keys_df: DataFrame | None, client_map_df: DataFrame | None,
            previous_df: DataFrame | None, *, run_date: dt.date, run_id: str, namespaced: bool,
            max_ids_per_key: int, max_iterations: int) -> Resolution:
    """Unified ids for ``source_ids_df`` (source_name, source_customer_id, first_order_date) from
    the hashed keys (IDENTITY_KEYS rows, already limited to identity.match_on), the client's map
    (source_name, source_customer_id, customer_id) and the previous IDENTITY_MAP. See the module
    docstring for the rules."""
    nodes_df = _nodes(source_ids_df, previous_df, namespaced)
    conflict_base = [F.lit(run_id).alias("identity_run_id"), F.lit(run_date).alias("run_date")]
    conflict_parts: list[DataFrame] = []
    edge_parts: list[DataFrame] = []
    mapped_df = None
    if client_map_df is not None:
        mapped_df, map_conflicts_df = _map_claims(client_map_df, nodes_df, conflict_base)
        conflict_parts.append(map_conflicts_df)
    if keys_df is not None:
        key_edges_df, key_conflicts_df = _key_edges(keys_df, nodes_df, max_ids_per_key, conflict_base)
        edge_parts.append(key_edges_df)
        conflict_parts.append(key_conflicts_df)
    if mapped_df is not None:
        edge_parts.append(mapped_df.select("node", map_vertex(F.col("map_id")).alias("vertex")))

    iterations = 0
    members_df = nodes_df
    if mapped_df is not None:
        members_df = members_df.join(mapped_df, on="node", how="left")
    else:
        members_df = members_df.withColumn("map_id", F.lit(None).cast("string"))
    if edge_parts:
        edges_df = edge_parts[0]
        for part in edge_parts[1:]:
            edges_df = edges_df.unionByName(part)
        # no distinct: each part holds each edge once, and key and map vertices differ by prefix
        labels_df, iterations = connected_components(edges_df.localCheckpoint(), max_iterations)
        members_df = members_df.join(labels_df, on="node", how="left")
    else:
        members_df = members_df.withColumn("label", F.lit(None).cast("string"))
    # A source id linked to nobody that is new or keeps its own id is its own customer (rule 3 for a
    # component of one): only the others (linked, mapped, or leaving an earlier customer; ~15% of
    # the ids) go through the rules below, so those shuffles are of the few, not of every id.
    alone = F.col("label").isNull() & F.coalesce(F.col("_previous") == F.col("own_id"), F.lit(True))
    members_df = (members_df.withColumn("component", F.coalesce("label", "node")).withColumn("_alone", alone)
                  .drop("label").localCheckpoint())
    alone_df = members_df.where(F.col("_alone")).withColumn("customer_id", F.col("own_id"))
    members_df = members_df.where(~F.col("_alone")).drop("_alone")
    if mapped_df is not None:
        members_df, split_conflicts_df = _split_by_map(members_df, conflict_base)
        conflict_parts.append(split_conflicts_df)
    members_df = members_df.localCheckpoint()
    chosen_df = _component_ids(members_df, alone_df, run_date)

    result_df = (_map_rows(members_df.join(chosen_df, on="component", how="inner"), run_date, run_id)
                 .unionByName(_map_rows(alone_df, run_date, run_id)))
    conflicts_df = conflict_parts[0] if conflict_parts else _empty_conflicts(source_ids_df.sparkSession)
    for part in conflict_parts[1:]:
        conflicts_df = conflicts_df.unionByName(part)
    return Resolution(result_df, conflicts_df, iterations)


def _nodes(source_ids_df: DataFrame, previous_df: DataFrame | None, namespaced: bool) -> DataFrame:
    """Every source id as a graph node, with its own id and what the previous IDENTITY_MAP gave it."""
    nodes_df = source_ids_df.select(
        "source_name", "source_customer_id", "first_order_date",
        node_id(F.col("source_name"), F.col("source_customer_id")).alias("node"),
        own_customer_id(F.col("source_name"), F.col("source_customer_id"), namespaced).alias("own_id"))
    if previous_df is not None:
        nodes_df = nodes_df.join(previous_df.select(
            "source_name", "source_customer_id", F.col("customer_id").alias("_previous"),
            F.col("first_seen").alias("_previous_seen"), F.col("assigned_on").alias("_previous_assigned")),
            on=["source_name", "source_customer_id"], how="left")
    else:
        nodes_df = (nodes_df.withColumn("_previous", F.lit(None).cast("string"))
                    .withColumn("_previous_seen", F.lit(None).cast("date"))
                    .withColumn("_previous_assigned", F.lit(None).cast("date")))
    return nodes_df.localCheckpoint()


def _map_claims(client_map_df: DataFrame, nodes_df: DataFrame,
                conflict_base: list[Column]) -> tuple[DataFrame, DataFrame]:
    """The client's map: one customer per source id, (node, map_id); a source id the map gives
    several customers keeps the one it had, else the smallest (a map_conflict row)."""
    claims_df = (client_map_df.join(nodes_df.select("source_name", "source_customer_id", "node", "_previous"),
                                    on=["source_name", "source_customer_id"], how="inner")
                 .groupBy("source_name", "source_customer_id", "node", "_previous")
                 .agg(F.array_sort(F.collect_set("customer_id")).alias("claims")))
    kept = F.when(F.array_contains("claims", F.col("_previous")), F.col("_previous")).otherwise(F.col("claims")[0])
    mapped_df = claims_df.select("node", kept.alias("map_id")).localCheckpoint()
    conflicts_df = claims_df.where(F.size("claims") > 1).select(
        *conflict_base, F.lit(MAP_CONFLICT).alias("reason"), "source_name", "source_customer_id",
        F.lit(None).cast("string").alias("key_type"), F.lit(None).cast("string").alias("key_hash"),
        F.col("claims").alias("candidates"),
        F.concat(F.lit("identity.map gives this id several customers: kept "), kept,
                 F.lit(" (the one it had, else the smallest)")).alias("resolution"))
    return mapped_df, conflicts_df


def _key_edges(keys_df: DataFrame, nodes_df: DataFrame, max_ids_per_key: int,
               conflict_base: list[Column]) -> tuple[DataFrame, DataFrame]:
    """Matching keys: (node, vertex) edges of the keys held by two to ``max_ids_per_key`` source
    ids with orders, and key_too_common rows for the keys held by more. Each (node, vertex) once:
    a key's holders are a set."""
    # identity_keys holds each (source id, key) once: no distinct (a shuffle of every key); the
    # holders are counted as a set all the same. Most keys have one holder: a window counts them
    # (a sort; a set per key over every key is an object aggregate that spills), and only the
    # shared keys' rows meet the nodes. The edges come from those keys' holder lists, not from a
    # second join with the nodes.
    shared_df = (keys_df.withColumn("_ids", F.count(F.lit(1)).over(Window.partitionBy("key_type", "key_hash")))
                 .where(F.col("_ids") >= 2))
    held_df = (shared_df.join(nodes_df.select("source_name", "source_customer_id", "node", "own_id"),
                              on=["source_name", "source_customer_id"], how="inner")
               .select("key_type", "key_hash", "node", "own_id"))
    per_key_df = (held_df.groupBy("key_type", "key_hash")
                  # own_id is one to one with node: sorted by it, as the conflicts list them
                  .agg(F.array_sort(F.collect_set(F.struct("own_id", "node"))).alias("_holders"))
                  .where(F.size("_holders") >= 2)
                  .select("key_type", "key_hash", F.size("_holders").alias("holders"), "_holders").localCheckpoint())
    conflicts_df = _too_common_keys(per_key_df, conflict_base, max_ids_per_key,
                                    F.transform(F.slice("_holders", 1, 20), lambda holder: holder["own_id"]))
    edges_df = per_key_df.where(F.col("holders") <= max_ids_per_key).select(
        F.explode(F.transform("_holders", lambda holder: holder["node"])).alias("node"),
        key_vertex(F.col("key_type"), F.col("key_hash")).alias("vertex"))
    return edges_df, conflicts_df


def _split_by_map(members_df: DataFrame, conflict_base: list[Column]) -> tuple[DataFrame, DataFrame]:
    """match_conflict: a component holding two mapped customers is cut back, the map wins: each
    mapped id goes to its mapped customer's component, the unmapped ids stay on their own."""
    map_ids_df = (members_df.where(F.col("map_id").isNotNull()).groupBy("component")
                  .agg(F.array_sort(F.collect_set("map_id")).alias("_map_ids")))
    members_df = members_df.join(map_ids_df, on="component", how="left")
    is_split = F.coalesce(F.size("_map_ids") > 1, F.lit(False))
    conflicts_df = members_df.where(is_split & F.col("map_id").isNull()).select(
        *conflict_base, F.lit(MATCH_CONFLICT).alias("reason"), "source_name", "source_customer_id",
        F.lit(None).cast("string").alias("key_type"), F.lit(None).cast("string").alias("key_hash"),
        F.col("_map_ids").alias("candidates"),
        F.lit("its matching keys join customers identity.map keeps apart: not linked (the map wins)")
        .alias("resolution"))
    members_df = (members_df
                  .withColumn("component", F.when(is_split & F.col("map_id").isNotNull(),
                                                  map_vertex(F.col("map_id")))
                              .when(is_split, F.col("node")).otherwise(F.col("component")))
                  .drop("_map_ids"))
    return members_df, conflicts_df


def _component_ids(members_df: DataFrame, alone_df: DataFrame, run_date: dt.date) -> DataFrame:
    """(component, customer_id): the unified id of each component of ``members_df`` (module
    docstring, rules 1-3), given the ids on their own in ``alone_df``."""
    candidates_df = (members_df
                     .select("component", F.coalesce("_previous", "own_id").alias("candidate"),
                             F.coalesce("_previous_seen", F.lit(run_date)).alias("seen"), "first_order_date")
                     .groupBy("component", "candidate")
                     .agg(F.min("seen").alias("seen"), F.min("first_order_date").alias("first_order_date")))
    chosen_df = (candidates_df.groupBy("component")
                 .agg(F.min(F.struct("seen", "first_order_date", "candidate")).alias("_best"))
                 .join(members_df.groupBy("component").agg(F.min("map_id").alias("_mapped"),
                                                            F.min("own_id").alias("_own_min")),
                       on="component", how="inner")
                 .withColumn("customer_id", F.coalesce("_mapped", F.col("_best.candidate")))
                 .localCheckpoint())
    # A component split by a changed map (or by keys that no longer link) can find its old id taken:
    # by the other part (the part with the smallest component label keeps it, the others take their
    # smallest own id) or by the source id whose own id it is and which is now on its own (that one
    # keeps it: it has no other id to take).
    keeper_df = chosen_df.groupBy("customer_id").agg(F.min("component").alias("_keeper"))
    chosen_df = (chosen_df.join(keeper_df, on="customer_id", how="inner")
                 .withColumn("customer_id", F.when(F.col("component") == F.col("_keeper"), F.col("customer_id"))
                             .otherwise(F.col("_own_min"))))
    taken_df = (alone_df.select("customer_id", F.lit(True).alias("_taken"))
                .join(chosen_df.select("customer_id").distinct(), on="customer_id", how="left_semi"))
    return (chosen_df.join(taken_df, on="customer_id", how="left")
            .withColumn("customer_id", F.when(F.col("_taken"), F.col("_own_min")).otherwise(F.col("customer_id")))
            .select("component", "customer_id"))


def _map_rows(df: DataFrame, run_date: dt.date, run_id: str) -> DataFrame:
    """IDENTITY_MAP rows (plus ``_previous``) of nodes that have their ``customer_id``."""
    return df.select("source_name", "source_customer_id", "customer_id",
                     id_method(F.col("map_id"), F.col("customer_id"), F.col("own_id")).alias("method"),
                     F.coalesce("_previous_seen", F.lit(run_date)).alias("first_seen"),
                     F.when(F.col("_previous") == F.col("customer_id"), F.col("_previous_assigned"))
                     .otherwise(F.lit(run_date)).alias("assigned_on"),
                     F.lit(run_id).alias("identity_run_id"), "_previous")


#: a night with more new source ids than this resolves every id: the incremental path broadcasts them
INCREMENTAL_MAX_NEW_IDS = 1_000_000


@dataclass(frozen=True)
class NightKeys:
    """What the ingest's comparison of a night's matching keys with ``identity_keys`` found
    (:func:`pipelines.ingest.add_keys`): the keys it appended and every holder of a key read
    tonight (stored before, or appended), and the table's version before its one append. The
    identity step takes the new keys' holders from it instead of scanning the table again, when
    no other append came between its last run and this one."""
    added_df: DataFrame          # IDENTITY_KEYS rows appended tonight
    holders_df: DataFrame        # (source_name, source_customer_id, key_type, key_hash) of tonight's keys
    version_before: int          # identity_keys before the append


@dataclass(frozen=True)
class NewIdsResolution:
    map_df: DataFrame            # IDENTITY_MAP rows of the new source ids only (plus _previous, null)
    conflicts_df: DataFrame      # key_too_common rows of the keys the night touched
    new_source_ids: int
    new_customers: int           # unified ids no earlier source id had
    linked_source_ids: int       # new ids whose unified id is another id's
    iterations: int


def resolve_new_ids(appended_orders_df: DataFrame, appended_keys_df: DataFrame | None, keys_df: DataFrame | None,
                    previous_df: DataFrame, *, run_date: dt.date, run_id: str, namespaced: bool,
                    max_ids_per_key: int, max_iterations: int,
                    known_holders_df: DataFrame | None = None) -> NewIdsResolution | str:
    """Unified ids for the source ids that appeared since the previous resolution (``previous_df``,
    the IDENTITY_MAP), from the orders and keys appended since: the same ids :func:`resolve` gives
    when nothing earlier moves. Returns why every id must be resolved instead when something
    would move: tonight's keys link customers that were apart (a merge), or a key that linked ids
    became too common. Reads the large tables only through semi-joins with what is new (no shuffle
    of the whole map or key table). ``known_holders_df``: every holder of the appended keys (and
    maybe of others), found by the ingest's scan (:class:`NightKeys`): no scan of ``keys_df`` then."""
    id_columns = ["source_name", "source_customer_id"]
    seen_df = source_customer_ids(appended_orders_df).localCheckpoint()
    seen = seen_df.count()
    if seen > INCREMENTAL_MAX_NEW_IDS:
        return f"{seen:,} source ids have new orders (more than {INCREMENTAL_MAX_NEW_IDS:,})"
    holders_df = None
    if appended_keys_df is not None and keys_df is not None:
        touched_df = appended_keys_df.select("key_type", "key_hash").distinct().localCheckpoint()
        if touched_df.count() > INCREMENTAL_MAX_NEW_IDS:
            return "more new matching keys than the incremental resolution broadcasts"
        # every holder of a touched key (one scan of identity_keys, unless the ingest's scan found them)
        holders_df = (keys_df if known_holders_df is None else known_holders_df)
        holders_df = (holders_df.join(F.broadcast(touched_df), on=["key_type", "key_hash"], how="left_semi")
                      .select(*id_columns, "key_type", "key_hash").localCheckpoint())
    # one scan of identity_map for every earlier id the night needs: those with new orders and the
    # holders of a touched key (with the customer each has)
    wanted_df = seen_df.select(*id_columns)
    if holders_df is not None:
        wanted_df = wanted_df.unionByName(holders_df.select(*id_columns)).distinct()
    earlier_df = (previous_df.join(F.broadcast(wanted_df), on=id_columns, how="left_semi")
                  .select(*id_columns, F.col("customer_id").alias("_existing")).localCheckpoint())
    new_df = (seen_df.join(earlier_df, on=id_columns, how="left_anti")
              .select("source_name", "source_customer_id", "first_order_date",
                      node_id(F.col("source_name"), F.col("source_customer_id")).alias("node"),
                      own_customer_id(F.col("source_name"), F.col("source_customer_id"), namespaced).alias("own_id"))
              .localCheckpoint())
    conflicts_df = None
    members_df = new_df.select("node", "own_id", "first_order_date", F.lit(None).cast("string").alias("_existing"))
    labels_df, iterations = None, 0
    if holders_df is not None:
        linked = _linked_by_new_keys(appended_keys_df, holders_df, earlier_df, new_df, members_df, run_date=run_date,
                                     run_id=run_id, max_ids_per_key=max_ids_per_key, max_iterations=max_iterations)
        if isinstance(linked, str):
            return linked
        members_df, labels_df, iterations, conflicts_df = linked
    if labels_df is not None:
        members_df = members_df.join(labels_df, on="node", how="left")
    else:
        members_df = members_df.withColumn("label", F.lit(None).cast("string"))
    members_df = members_df.withColumn("component", F.coalesce("label", "node")).drop("label")
    chosen_df = (members_df.groupBy("component")
                 .agg(F.array_sort(F.collect_set("_existing")).alias("_customers"),
                      F.min(F.struct(F.col("first_order_date"), F.col("own_id"))).alias("_oldest"))
                 .localCheckpoint())
    merges = chosen_df.where(F.size("_customers") > 1).count()
    if merges:
        return f"tonight's matching keys join {merges:,} group(s) of customers that were apart (a merge)"
    # an earlier customer keeps its id; a group of new ids only takes the id of its oldest (rule 2, 3)
    chosen_df = chosen_df.select("component", F.coalesce(F.get("_customers", 0), F.col("_oldest.own_id"))
                                 .alias("customer_id"), (F.size("_customers") == 0).alias("_new_customer"))
    result_df = (new_df.join(members_df.select("node", "component"), on="node", how="inner")
                 .join(chosen_df, on="component", how="inner")
                 .select(*id_columns, "customer_id",
                         id_method(F.lit(None), F.col("customer_id"), F.col("own_id")).alias("method"),
                         F.lit(run_date).alias("first_seen"), F.lit(run_date).alias("assigned_on"),
                         F.lit(run_id).alias("identity_run_id"), F.lit(None).cast("string").alias("_previous"),
                         "_new_customer")
                 .localCheckpoint())
    stats = result_df.agg(F.count(F.lit(1)).alias("ids"),
                          F.count_distinct(F.when(F.col("_new_customer"), F.col("customer_id"))).alias("customers"),
                          F.count_if(F.col("method") != METHOD_OWN).alias("linked")).first()
    if conflicts_df is None:
        conflicts_df = _empty_conflicts(result_df.sparkSession)
    return NewIdsResolution(result_df.drop("_new_customer"), conflicts_df, int(stats["ids"]),
                            int(stats["customers"] or 0), int(stats["linked"]), iterations)


def _too_common_keys(per_key_df: DataFrame, conflict_base: list[Column], max_ids_per_key: int,
                     candidates: Column) -> DataFrame:
    """key_too_common conflict rows of the keys in ``per_key_df`` (``key_type``, ``key_hash``,
    ``holders``) held by more than ``max_ids_per_key`` source ids; ``candidates``: up to 20 of
    their unified ids."""
    return per_key_df.where(F.col("holders") > max_ids_per_key).select(
        *conflict_base, F.lit(KEY_TOO_COMMON).alias("reason"), F.lit(None).cast("string").alias("source_name"),
        F.lit(None).cast("string").alias("source_customer_id"), "key_type", "key_hash", candidates.alias("candidates"),
        F.concat(F.lit("not used: held by "), F.col("holders").cast("string"),
                 F.lit(f" source ids (identity.max_ids_per_key={max_ids_per_key}; the first 20 listed)"))
        .alias("resolution"))


def _linked_by_new_keys(appended_keys_df: DataFrame, holders_df: DataFrame, earlier_df: DataFrame,
                        new_df: DataFrame, members_df: DataFrame, *, run_date: dt.date, run_id: str,
                        max_ids_per_key: int, max_iterations: int
                        ) -> tuple[DataFrame, DataFrame | None, int, DataFrame] | str:
    """The links tonight's matching keys make among their holders (earlier ids with their customer,
    new ids): the members with the earlier customers they reach, the connected components' labels
    (None without a linking key), the iterations and the keys too common to use (conflicts). Returns
    why every id must be resolved instead when a key that linked ids became too common."""
    labels_df, iterations = None, 0
    id_columns = ["source_name", "source_customer_id"]
    # a holder that has orders: an earlier id (with its customer) or a new one
    fresh = appended_keys_df.select(*id_columns, "key_type", "key_hash").withColumn("_fresh", F.lit(True))
    held_df = (holders_df.join(earlier_df, on=id_columns, how="left")
               .join(new_df.select(*id_columns, "own_id"), on=id_columns, how="left")
               .where(F.col("_existing").isNotNull() | F.col("own_id").isNotNull())
               .join(fresh, on=[*id_columns, "key_type", "key_hash"], how="left")
               .withColumn("_before", F.col("_existing").isNotNull() & F.col("_fresh").isNull())
               .withColumn("node", node_id(F.col("source_name"), F.col("source_customer_id")))
               .localCheckpoint())
    per_key_df = (held_df.groupBy("key_type", "key_hash")
                  .agg(F.count(F.lit(1)).alias("holders"), F.count_if("_before").alias("holders_before"),
                       F.slice(F.array_sort(F.collect_list(F.coalesce("_existing", "own_id"))), 1, 20)
                       .alias("candidates")).localCheckpoint())
    unlinked = per_key_df.where((F.col("holders") > max_ids_per_key) & (F.col("holders_before") >= 2)
                                & (F.col("holders_before") <= max_ids_per_key)).count()
    if unlinked:
        return f"{unlinked:,} matching key(s) that linked source ids are now held by more than {max_ids_per_key}"
    conflicts_df = _too_common_keys(per_key_df, [F.lit(run_id).alias("identity_run_id"),
                                                 F.lit(run_date).alias("run_date")],
                                    max_ids_per_key, F.col("candidates"))
    linking_df = per_key_df.where(F.col("holders").between(2, max_ids_per_key)).select("key_type", "key_hash")
    edges_df = (held_df.join(linking_df, on=["key_type", "key_hash"], how="left_semi")
                .select("node", key_vertex(F.col("key_type"), F.col("key_hash"))
                        .alias("vertex")).distinct().localCheckpoint())
    if edges_df.limit(1).count():
        labels_df, iterations = connected_components(edges_df, max_iterations)
        existing_df = (held_df.where(F.col("_existing").isNotNull())
                       .select("node", "_existing", F.lit(None).cast("string").alias("own_id"),
                               F.lit(None).cast("date").alias("first_order_date")).distinct())
        members_df = (members_df.select("node", "own_id", "first_order_date", "_existing")
                      .unionByName(existing_df.select("node", "own_id", "first_order_date", "_existing")))
    return members_df, labels_df, iterations, conflicts_df


def _empty_conflicts(spark: SparkSession) -> DataFrame:
    return spark.createDataFrame([], IDENTITY_CONFLICTS.schema)


#: up to this many source ids not on their own id (linked or mapped) go broadcast to an orders scan
UNIFY_BROADCAST_MAX = 1_000_000


@dataclass(frozen=True)
class IdLookup:
    """How stored orders get their unified ``customer_id`` from an IDENTITY_MAP, without joining
    every order with the whole map: most source ids are on their own id (method ``own``:
    ``<source>:<id>`` with several sources, else the id), which a column expression gives; only
    the others (linked or mapped: ~12% of the ids of a client with 20% overlap) are looked up,
    broadcast up to :data:`UNIFY_BROADCAST_MAX` rows, so the orders are never shuffled for it. A
    source id the map does not hold (orders ingested after the last identity run) is on its own
    id as well."""
    others_df: DataFrame        # (_map_source, _map_id, _unified) of the ids not on their own id
    namespaced: bool
    broadcast: bool

    @classmethod
    def of(cls, identity_df: DataFrame, materialise: bool = False) -> "IdLookup":
        """How many ids are not on their own id, and the form of an own id, from one scan of the
        map; ``materialise``: keep those rows for several lookups in a run (features, trends):
        then the scan that keeps them also counts them, and one own row, read with a limit, gives
        the form (2M-id map: 1.26 s where a counting scan and a keeping scan took 2.14 s). Kept
        also above the broadcast bound (spilled to disk as needed): every lookup reads them."""
        is_own = F.col("method") == METHOD_OWN
        is_namespaced = F.col("customer_id") == own_customer_id(F.col("source_name"), F.col("source_customer_id"), True)
        others_df = identity_df.where(~is_own).select(F.col("source_name").alias("_map_source"),
                                                       F.col("source_customer_id").alias("_map_id"),
                                                       F.col("customer_id").alias("_unified"))
        if materialise:
            others_df = others_df.localCheckpoint(eager=False)
            others = others_df.count()
            own_rows = identity_df.where(is_own).select(is_namespaced).limit(1).collect()
            namespaced = bool(own_rows and own_rows[0][0])     # a map's own ids all have one form
        else:
            shape = identity_df.agg(F.count_if(~is_own).alias("others"),
                                    F.max(F.when(is_own, is_namespaced)).alias("namespaced")).first()
            others, namespaced = shape["others"], bool(shape["namespaced"])
        return cls(others_df, namespaced, others <= UNIFY_BROADCAST_MAX)

    def apply(self, orders_df: DataFrame) -> DataFrame:
        """``orders_df`` (stored source ids) with ``customer_id`` the unified id."""
        lookup_df = F.broadcast(self.others_df) if self.broadcast else self.others_df
        source = order_source(orders_df)
        own_id = own_customer_id(source, F.col("customer_id"), self.namespaced)
        joined_df = orders_df.join(lookup_df, on=(source == F.col("_map_source"))
                                   & (F.col("customer_id") == F.col("_map_id")), how="left")
        return (joined_df.withColumn("customer_id", F.coalesce(F.col("_unified"), own_id))
                .drop("_map_source", "_map_id", "_unified"))

    def orders_of(self, orders_df: DataFrame, customers_df: DataFrame) -> DataFrame:
        """The stored ``orders_df`` of the few unified customers in ``customers_df``, on the unified id.
        The orders are first cut to the source ids that can be theirs (their linked ids, and the id
        each customer id is the own id of), a probe per order as cheap as a plain semi-join; only
        those few are looked up and checked."""
        customers_df = customers_df.select("customer_id").distinct()
        linked_df = self.others_df.join(customers_df.withColumnRenamed("customer_id", "_unified"), on="_unified",
                                        how="left_semi").select("_map_source", "_map_id")
        if self.namespaced:     # <source>:<id>; a source name holds no ':'
            own_df = customers_df.select(F.substring_index("customer_id", ":", 1).alias("_map_source"),
                                         F.expr("substr(customer_id, instr(customer_id, ':') + 1)").alias("_map_id"))
            candidates_df = F.broadcast(linked_df.unionByName(own_df))
            source = order_source(orders_df)
            few_df = orders_df.join(candidates_df, on=(source == F.col("_map_source"))
                                    & (F.col("customer_id") == F.col("_map_id")), how="left_semi")
        else:                   # one source: the id alone
            candidates_df = F.broadcast(linked_df.select(F.col("_map_id").alias("customer_id"))
                                        .unionByName(customers_df))
            few_df = orders_df.join(candidates_df, on="customer_id", how="left_semi")
        return self.apply(few_df).join(F.broadcast(customers_df), on="customer_id", how="left_semi")


# --------------------------------------------------------------------------------------------
# Reading orders on the unified id (every stage after ingest)
# --------------------------------------------------------------------------------------------
def identity_version(storage: Storage) -> int | None:
    return storage.version(IDENTITY_MAP) if storage.exists(IDENTITY_MAP) else None


def read_orders(storage: Storage, version: int | None = None, *, identity_at: int | None = None) -> DataFrame:
    """``orders`` (at ``version``) with ``customer_id`` the unified id when the identity step has
    run (``identity_map`` at ``identity_at``, default the latest); otherwise as stored."""
    orders_df = storage.read(ORDERS, version=version)
    return with_unified_ids(storage, orders_df, identity_at)


def with_unified_ids(storage: Storage, orders_df: DataFrame, identity_at: int | None = None) -> DataFrame:
    if not storage.exists(IDENTITY_MAP):
        return orders_df
    return IdLookup.of(storage.read(IDENTITY_MAP, version=identity_at)).apply(orders_df)


# --------------------------------------------------------------------------------------------
# Stage runner
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IdentitySummary:
    identity_run_id: str
    run_date: dt.date
    source_ids: int
    customers: int
    linked_source_ids: int
    new_source_ids: int
    reassigned_source_ids: int
    conflicts: int
    conflict_counts: dict[str, int] = field(default_factory=dict)
    iterations: int = 0
    write_mode: str = "unchanged"
    mode: str = "full"                  # full | incremental (only the ids and keys new since the last run)
    full_reason: str | None = None
    seconds: float = 0.0

    def to_lines(self) -> list[str]:
        n = "{:,}".format
        lines = [f"identity {self.identity_run_id}: {n(self.source_ids)} source customer ids -> "
                 f"{n(self.customers)} customers ({n(self.linked_source_ids)} source ids linked to another, "
                 f"{n(self.new_source_ids)} new, {n(self.reassigned_source_ids)} merged into an older customer; "
                 f"{self.iterations} propagation round(s), identity_map {self.write_mode}; "
                 + (f"full: {self.full_reason})" if self.mode == "full" else "new ids only)")]
        if self.conflicts:
            shown = ", ".join(f"{reason} {n(count)}" for reason, count in sorted(self.conflict_counts.items()))
            lines.append(f"  {n(self.conflicts)} conflict(s) not linked ({shown}): `cvseg show identity_conflicts`")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.to_lines())

    def asdict(self) -> dict[str, Any]:
        out = asdict(self)
        out["run_date"] = self.run_date.isoformat()
        return out


def read_client_map(spark: SparkSession, path: str, source_names: Sequence[str], map_format: str = "csv") -> DataFrame:
    """identity.map: source_name, source_customer_id, customer_id from a UTF-8 CSV with a header,
    a parquet or Delta path, or a table name (``map_format``)."""
    from pyspark.errors import AnalysisException

    try:
        if map_format == "csv":
            map_df = spark.read.option("header", True).option("encoding", "UTF-8").csv(path)
        elif map_format == "table":
            map_df = spark.table(path)
        else:
            map_df = spark.read.format(map_format).load(path)
    except AnalysisException as exc:
        what = {"csv": "a CSV file with the header source_name,source_customer_id,customer_id",
                "table": "a table holding source_name, source_customer_id, customer_id"}.get(
            map_format, f"a {map_format} path holding source_name, source_customer_id, customer_id")
        raise IdentityError(f"identity.map: cannot read {path} as {map_format} ({str(exc).splitlines()[0][:200]}); "
                            f"point it at {what} (identity.map_format says which)") from None
    missing = [c for c in MAP_COLUMNS if c not in map_df.columns]
    if missing:
        raise IdentityError(f"identity.map {path}: missing column(s) {missing} (found {map_df.columns}); "
                            "the map must hold source_name, source_customer_id, customer_id (a CSV: as its header)")
    trimmed_df = map_df.select(*[F.trim(F.col(c).cast("string")).alias(c) for c in MAP_COLUMNS]).where(
        F.col("source_name").isNotNull() & F.col("source_customer_id").isNotNull()
        & F.col("customer_id").isNotNull() & (F.col("customer_id") != ""))
    unknown = [r[0] for r in trimmed_df.select("source_name").distinct()
               .where(~F.col("source_name").isin(list(source_names))).limit(5).collect()]
    if unknown:
        raise IdentityError(f"identity.map {path}: source_name {unknown} is not a configured source "
                            f"({list(source_names)}); use the names of `sources`")
    return trimmed_df


def source_customer_ids(orders_df: DataFrame) -> DataFrame:
    """(source_name, source_customer_id, first_order_date) of every source id with an order."""
    return (orders_df.groupBy(order_source(orders_df).alias("source_name"),
                              F.col("customer_id").alias("source_customer_id"))
            .agg(F.min("order_date").alias("first_order_date")))


def identity_settings(identity: IdentityConf) -> str:
    """What a resolution depends on besides the tables, as stable JSON: another value resolves every id."""
    import json

    return json.dumps(identity.model_dump(mode="json"), sort_keys=True)


def incremental_inputs(storage: Storage, identity: IdentityConf, previous_version: int | None,
                       night_keys: NightKeys | None = None
                       ) -> tuple[DataFrame, DataFrame | None, Any, DataFrame | None] | str:
    """(orders appended since the last identity run, matching keys appended since, that run's
    identity_runs row, every holder of those keys when ``night_keys`` knows them) when the night
    can resolve only its new source ids; otherwise why every id must be resolved."""
    if previous_version is None:
        return "no earlier identity_map"
    if identity.map:
        return "identity.map is set (the client's map is read whole on every run)"
    if not storage.exists(IDENTITY_RUNS):
        return "no earlier identity run"
    last = storage.read(IDENTITY_RUNS).orderBy(F.desc("finished_at")).limit(1).collect()[0]
    if last["identity_map_version"] != previous_version:
        return "identity_map was written after the last identity run"
    if last["orders_version"] is None:
        return "the last identity run did not record the versions it read"
    if last["settings"] != identity_settings(identity):
        return f"the identity settings changed (were {last['settings']})"
    appended_orders_df = storage.appended_since(ORDERS, int(last["orders_version"]))
    if appended_orders_df is None:
        return f"orders were rewritten since version {last['orders_version']} (not only appended)"
    appended_keys_df = holders_df = None
    if identity.match_on and storage.exists(IDENTITY_KEYS):
        if night_keys is not None and last["keys_version"] == night_keys.version_before:
            # tonight's ingest appended the only keys since the last run and found their holders
            appended_keys_df, holders_df = night_keys.added_df, night_keys.holders_df
        elif last["keys_version"] is None:
            appended_keys_df = storage.read(IDENTITY_KEYS)      # keys arrived since: all of them are new
        else:
            appended_keys_df = storage.appended_since(IDENTITY_KEYS, int(last["keys_version"]))
            if appended_keys_df is None:
                return f"identity_keys were rewritten since version {last['keys_version']} (not only appended)"
        appended_keys_df = appended_keys_df.where(F.col("key_type").isin(list(identity.match_on)))
    return appended_orders_df, appended_keys_df, last, holders_df


def run_identity(storage: Storage, identity: IdentityConf, source_names: Sequence[str], run_date: dt.date, *,
                 run_id: str | None = None, full: bool = False, night_keys: NightKeys | None = None) -> IdentitySummary:
    """Resolve every source customer id in ``orders`` to a unified id: write ``identity_map``
    (appended when only new source ids arrived, rewritten when an id moved), the run's
    ``identity_conflicts`` and one ``identity_runs`` row.

    A regular night resolves only the source ids and keys that arrived since the last run
    (:func:`resolve_new_ids`, reading the large tables through semi-joins); the first run, a
    client map, rewritten orders or keys, a merge or ``full`` resolve every id (:func:`resolve`).
    ``night_keys``: what tonight's ingest found comparing its keys with ``identity_keys``."""
    started = time.perf_counter()
    spark = storage.spark
    run_id = run_id or f"identity-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    if not storage.exists(ORDERS):
        raise IdentityError("no orders yet: run `cvseg ingest` first")
    orders_version = storage.version(ORDERS)
    keys_version = storage.version(IDENTITY_KEYS) if storage.exists(IDENTITY_KEYS) else None
    keys_df = None
    if identity.match_on and keys_version is not None:
        keys_df = (storage.read(IDENTITY_KEYS, version=keys_version)
                   .where(F.col("key_type").isin(list(identity.match_on))))
    namespaced = len(source_names) > 1
    previous_version = identity_version(storage)
    previous_df = storage.read(IDENTITY_MAP, version=previous_version) if previous_version is not None else None
    inputs = "requested" if full else incremental_inputs(storage, identity, previous_version, night_keys)
    new_ids = inputs if isinstance(inputs, str) else resolve_new_ids(
        inputs[0], inputs[1], keys_df, previous_df, run_date=run_date, run_id=run_id, namespaced=namespaced,
        max_ids_per_key=identity.max_ids_per_key, max_iterations=identity.max_iterations, known_holders_df=inputs[3])
    if isinstance(new_ids, NewIdsResolution):
        mode, full_reason, last = "incremental", None, inputs[2]
        new, reassigned, iterations = new_ids.new_source_ids, 0, new_ids.iterations
        totals = {"source_ids": last["source_ids"] + new, "customers": last["customers"] + new_ids.new_customers,
                  "linked": last["linked_source_ids"] + new_ids.linked_source_ids}
        write_mode = "append" if new else "unchanged"
        if new:
            storage.append(IDENTITY_MAP, new_ids.map_df.drop("_previous"))
        conflicts_df = new_ids.conflicts_df
    else:
        mode, full_reason = "full", new_ids
        source_ids_df = source_customer_ids(storage.read(ORDERS, version=orders_version))
        client_map_df = (read_client_map(spark, identity.map, source_names, identity.map_format)
                         if identity.map else None)
        resolution = resolve(source_ids_df, keys_df, client_map_df, previous_df, run_date=run_date, run_id=run_id,
                             namespaced=namespaced, max_ids_per_key=identity.max_ids_per_key,
                             max_iterations=identity.max_iterations)
        result_df = resolution.map_df.localCheckpoint()
        stats = result_df.agg(
            F.count(F.lit(1)).alias("source_ids"), F.count_distinct("customer_id").alias("customers"),
            F.count_if(F.col("_previous").isNull()).alias("new"),
            F.count_if(F.col("_previous").isNotNull() & (F.col("_previous") != F.col("customer_id"))).alias("reassigned"),
            F.count_if(F.col("method") != METHOD_OWN).alias("linked")).first()
        reassigned, new, iterations = int(stats["reassigned"]), int(stats["new"]), resolution.iterations
        totals = {k: int(stats[k]) for k in ("source_ids", "customers", "linked")}
        # Appending keeps every existing row (so the features' update from the previous night stays
        # valid); a moved id rewrites the table, and the next features run computes in full.
        if previous_version is None or reassigned:
            write_mode = "overwrite"
            storage.overwrite(IDENTITY_MAP, result_df.drop("_previous"))
        elif new:
            write_mode = "append"
            storage.append(IDENTITY_MAP, result_df.where(F.col("_previous").isNull()).drop("_previous"))
        else:
            write_mode = "unchanged"
        conflicts_df = resolution.conflicts_df
    conflicts_df = conflicts_df.localCheckpoint()
    conflict_counts = {r["reason"]: int(r["count"]) for r in conflicts_df.groupBy("reason").count().collect()}
    if conflict_counts:
        storage.append(IDENTITY_CONFLICTS, conflicts_df)
    summary = IdentitySummary(
        identity_run_id=run_id, run_date=run_date, source_ids=totals["source_ids"], customers=totals["customers"],
        linked_source_ids=totals["linked"], new_source_ids=new, reassigned_source_ids=reassigned,
        conflicts=sum(conflict_counts.values()), conflict_counts=conflict_counts, iterations=iterations,
        write_mode=write_mode, mode=mode, full_reason=full_reason, seconds=round(time.perf_counter() - started, 2))
    run_row = (run_id, run_date, summary.source_ids, summary.customers, summary.linked_source_ids, new, reassigned,
               summary.conflicts, summary.iterations, write_mode, identity_version(storage),
               dt.datetime.now(dt.timezone.utc), mode, full_reason, orders_version, keys_version,
               identity_settings(identity))
    storage.append(IDENTITY_RUNS, spark.createDataFrame([run_row], IDENTITY_RUNS.schema))
    log.info("%s", summary)
    return summary


def identity_hmac_key(config: Config) -> bytes | None:
    """The key the matching keys are hashed with (the export's), when identity.match_on needs one."""
    if not config.identity.match_on:
        return None
    return hmac_key_from_env(config.export.hmac_key_env, needed_by=f"identity.match_on {list(config.identity.match_on)} "
                             "hashes its keys with the export's HMAC key",
                             alternative="remove identity.match_on", error=IdentityError)
