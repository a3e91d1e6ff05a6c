"""infra/: every entry point, verb and parameter named by the Databricks bundle, the EMR definition and
the Airflow DAG exists in the CLI (parsed with the real argparse parser; no cloud, no Airflow)."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from jobs.cli import VERBS, build_parser
from pipelines.nightly import STEPS

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SAMPLE_DATE = "2026-09-30"


def console_scripts() -> dict[str, str]:
    """name -> "module:attr" from setup.py's entry_points, read with ast (no install needed)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            return dict(s.replace(" ", "").split("=", 1) for s in scripts)
    raise AssertionError("setup.py has no entry_points")


def check_cli(arguments: list[str]) -> None:
    """The arguments parse with the real `cvseg` parser and name a known verb (argparse exits otherwise)."""
    assert arguments[0] in VERBS, f"unknown verb {arguments[0]!r}"
    try:
        build_parser().parse_args(arguments)
    except SystemExit as exc:
        raise AssertionError(f"`cvseg {' '.join(arguments)}` does not parse") from exc


def check_entry(name: str) -> None:
    target = console_scripts()[name]
    module_name, attr = target.split(":")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    assert callable(obj)


def test_check_cli_rejects_unknown_parameters():
    with pytest.raises(AssertionError):
        check_cli(["run", "--as-of", SAMPLE_DATE, "--stepz", "ingest"])
    with pytest.raises(AssertionError):
        check_cli(["run", "--as-of", SAMPLE_DATE, "--steps", "segmentz"])
    with pytest.raises(AssertionError):
        check_cli(["nightly", "--as-of", SAMPLE_DATE])


def test_databricks_bundle_tasks_call_existing_entry_points_and_parameters():
    bundle = yaml.safe_load((INFRA / "databricks" / "databricks.yml").read_text(encoding="utf-8"))
    assert set(bundle["targets"]) == {"dev", "prod"}
    assert bundle["targets"]["dev"]["variables"]["schedule_pause_status"] == "PAUSED"
    assert bundle["targets"]["prod"]["variables"]["schedule_pause_status"] == "UNPAUSED"
    job = bundle["resources"]["jobs"]["cvseg_nightly"]
    assert job["schedule"]["pause_status"] == "${var.schedule_pause_status}"
    variables = {name: spec.get("default") for name, spec in bundle["variables"].items()}
    steps_seen = []
    previous = None
    for task in job["tasks"]:
        wheel = task["python_wheel_task"]
        assert wheel["package_name"] == "cvseg"
        check_entry(wheel["entry_point"])
        params = [p.replace("{{job.parameters.as_of}}", SAMPLE_DATE) for p in wheel["parameters"]]
        for name, value in variables.items():
            params = [p.replace("${var." + name + "}", str(value)) for p in params]
        assert not any("${" in p or "{{" in p for p in params), params
        check_cli(params)
        args = build_parser().parse_args(params)
        assert args.steps == [task["task_key"]]
        steps_seen += args.steps
        if previous:
            assert task["depends_on"] == [{"task_key": previous}]
        previous = task["task_key"]
    assert steps_seen == list(STEPS)
    check_cli(["run", "--as-of", next(p["default"] for p in job["parameters"] if p["name"] == "as_of")])


def _load_submit():
    spec = importlib.util.spec_from_file_location("cvseg_emr_submit", INFRA / "emr" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emr_definition_and_submit_requests(capsys):
    import datetime as dt

    submit = _load_submit()
    definition = submit.load_definition()
    requests = submit.build_requests(definition, dt.date(2026, 9, 30))
    assert [r["name"] for r in requests] == [f"cvseg-2026-09-30-{s}" for s in STEPS]
    for request in requests:
        driver = request["jobDriver"]["sparkSubmit"]
        check_cli(driver["entryPointArguments"])
        assert SAMPLE_DATE in driver["entryPointArguments"]
        assert driver["entryPoint"].endswith("cvseg_main.py")
    assert (INFRA / "emr" / "cvseg_main.py").exists()
    main_tree = ast.parse((INFRA / "emr" / "cvseg_main.py").read_text(encoding="utf-8"))
    imported = {(n.module, a.name) for n in ast.walk(main_tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("jobs.cli", "main") in imported
    subset = submit.build_requests(definition, dt.date(2026, 9, 30), ["export", "score"])
    assert [r["name"].rsplit("-", 1)[1] for r in subset] == ["score", "export"]
    with pytest.raises(SystemExit, match="unknown step"):
        submit.build_requests(definition, dt.date(2026, 9, 30), ["scoring"])
    assert submit.main(["--as-of", SAMPLE_DATE, "--steps", "export", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["jobDriver"]["sparkSubmit"]["entryPointArguments"][:3] == ["run", "--as-of", SAMPLE_DATE]


def test_airflow_dag_commands_exist_in_the_cli():
    tree = ast.parse((INFRA / "airflow" / "cvseg_nightly.py").read_text(encoding="utf-8"))
    constants: dict[str, object] = {}
    commands = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "COMMANDS":
                commands = eval(compile(ast.Expression(node.value), "dag", "eval"),  # noqa: S307 - literals and names only
                                {"__builtins__": {}}, dict(constants))
            else:
                try:
                    constants[name] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    assert commands is not None, "the DAG must define COMMANDS"
    assert list(commands) == list(STEPS)
    for step, arguments in commands.items():
        rendered = [a.replace("{{ ds }}", SAMPLE_DATE) for a in arguments]
        check_cli(rendered)
        assert build_parser().parse_args(rendered).steps == [step]
    dag_ids = [kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
               for kw in node.keywords if kw.arg == "dag_id"]
    assert dag_ids == ["cvseg_nightly"]


def test_cli_step_names_match_the_orchestrator():
    from jobs.run import STEP_NAMES

    assert STEP_NAMES == STEPS


def test_every_spark_jvm_compiles_large_generated_methods(spark):
    """The JIT option (see core.spark) is on the local JVM and in both cluster definitions: without
    it Spark's generated code for ingest's rules runs interpreted, ~3x slower."""
    from core.spark import JIT_OPTIONS

    assert JIT_OPTIONS in spark.sparkContext.getConf().get("spark.driver.extraJavaOptions")
    runtime = spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()  # noqa: SLF001
    assert JIT_OPTIONS in list(runtime.getInputArguments())   # the running JVM got it, not only the conf
    bundle = yaml.safe_load((INFRA / "databricks" / "databricks.yml").read_text(encoding="utf-8"))
    clusters = [c["new_cluster"] for job in bundle["resources"]["jobs"].values() for c in job["job_clusters"]]
    assert clusters and all(JIT_OPTIONS in c["spark_conf"][f"spark.{side}.extraJavaOptions"]
                            for c in clusters for side in ("driver", "executor"))
    submit = json.loads((INFRA / "emr" / "job_run.json").read_text(encoding="utf-8"))
    params = json.dumps(submit)
    for side in ("driver", "executor"):
        assert f"spark.{side}.extraJavaOptions={JIT_OPTIONS}" in params


def test_every_spark_session_keeps_a_nights_generated_classes(spark):
    """The compiled-code cache (see core.spark) is set on the local session and in both cluster
    definitions: it is static, so a cluster that does not start with it compiles again."""
    from core.spark import CODEGEN_CACHE

    (key, entries), = CODEGEN_CACHE.items()
    assert int(entries) >= 2000 and spark.sparkContext.getConf().get(key) == entries
    bundle = yaml.safe_load((INFRA / "databricks" / "databricks.yml").read_text(encoding="utf-8"))
    clusters = [c["new_cluster"] for job in bundle["resources"]["jobs"].values() for c in job["job_clusters"]]
    assert clusters and all(c["spark_conf"][key] == entries for c in clusters)
    submit = json.dumps(json.loads((INFRA / "emr" / "job_run.json").read_text(encoding="utf-8")))
    assert f"--conf {key}={entries}" in submit


def test_a_local_session_rebuilds_delta_snapshots_in_a_few_partitions_and_clusters_keep_deltas_default(spark):
    """Local sessions set Delta's snapshot partitions to one per core (see core.spark); the cluster
    definitions leave Delta's default (sized for clusters) alone."""
    from core.spark import SNAPSHOT_PARTITIONS

    assert spark.conf.get(SNAPSHOT_PARTITIONS) == str(max(2, os.cpu_count() or 2))
    assert SNAPSHOT_PARTITIONS not in (INFRA / "databricks" / "databricks.yml").read_text(encoding="utf-8")
    assert SNAPSHOT_PARTITIONS not in (INFRA / "emr" / "job_run.json").read_text(encoding="utf-8")


def test_the_jvm_jars_are_pinned_once_and_infra_names_the_same_versions():
    """core/jars.lock is the one source: the delta-spark Python package, Spark's own Hadoop and every
    deployment definition agree with it."""
    import re
    from importlib.metadata import version

    import pyspark

    from core import jars

    delta = jars.version_of("delta-spark_2.13")
    assert jars.version_of("delta-storage") == delta == version("delta-spark")
    hadoop = {m.group(1) for p in (Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar")
              if (m := re.match(r"hadoop-client-api-(.+)\.jar", p.name))}
    assert hadoop == {jars.version_of("hadoop-aws")}, "hadoop-aws must match the Hadoop that Spark ships"

    emr = json.loads((INFRA / "emr" / "job_run.json").read_text(encoding="utf-8"))["sparkSubmitParameters"]
    (spark_jars,) = re.findall(r"--conf spark\.jars=(\S+)", emr)
    assert sorted(u.rsplit("/", 1)[1] for u in spark_jars.split(",")) == sorted(
        j.file_name for j in jars.pinned() if j.group == "delta")

    bundle = yaml.safe_load((INFRA / "databricks" / "databricks.yml").read_text(encoding="utf-8"))
    assert str(bundle["variables"]["delta_lake_version"]["default"]) == delta
    cluster = bundle["resources"]["jobs"]["cvseg_nightly"]["job_clusters"][0]["new_cluster"]
    assert cluster["custom_tags"]["cvseg_delta_lake"] == "${var.delta_lake_version}"

    tree = ast.parse((INFRA / "airflow" / "cvseg_nightly.py").read_text(encoding="utf-8"))
    fetch = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", None) == "FETCH_JARS")
    assert fetch[-3:] == ["-m", "core.jars", "fetch"]
    assert jars.main(["coordinates"]) == 0
