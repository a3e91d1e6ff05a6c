"""Airflow DAG: the nightly cvseg pipeline, one task per step, each running the same `cvseg` verb.

Copy this file into the DAGs folder of an Airflow (2.7+ or 3) whose workers have the cvseg wheel
installed (`pip install cvseg-<version>-py3-none-any.whl`) and Java 17. The as-of date is the run's
logical date `{{ ds }}`, stable across retries and clears, so a failed night resumes the same date:
committed steps are skipped by `cvseg run` itself. tests/unit/test_infra.py parses this file with
`ast` (Airflow need not be installed there) and checks every command against the CLI.
"""
from __future__ import annotations

import shlex
from datetime import datetime, timedelta

from airflow import DAG

try:   # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:   # Airflow 2
    from airflow.operators.bash import BashOperator

CONF = "/opt/cvseg/conf/client.yaml"   # the client's conf file on the workers

# Before the first step: the Delta Lake and s3a jars pinned in the installed wheel's core/jars.lock,
# into the worker's cache (a no-op when present), so the local Spark runs delta-spark.
FETCH_JARS = ["python", "-m", "core.jars", "fetch"]

# One command per step, in pipeline order (`cvseg` arguments; {{ ds }} is rendered by Airflow).
COMMANDS = {
    "ingest": ["run", "--as-of", "{{ ds }}", "--steps", "ingest", "--conf", CONF],
    "features": ["run", "--as-of", "{{ ds }}", "--steps", "features", "--conf", CONF],
    "score": ["run", "--as-of", "{{ ds }}", "--steps", "score", "--refit", "auto", "--conf", CONF],
    "segments": ["run", "--as-of", "{{ ds }}", "--steps", "segments", "--conf", CONF],
    "trends": ["run", "--as-of", "{{ ds }}", "--steps", "trends", "--conf", CONF],
    "export": ["run", "--as-of", "{{ ds }}", "--steps", "export", "--conf", CONF],
    # table maintenance: runs every maintenance.every_days, otherwise skips itself (exit 0)
    "maintain": ["run", "--as-of", "{{ ds }}", "--steps", "maintain", "--conf", CONF],
}

with DAG(
    dag_id="cvseg_nightly",
    description="customer 6-month value -> segments -> trends -> CSV export",
    schedule="30 2 * * *",                 # after the client's order export lands
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,                     # two nights must not interleave
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10), "env": {"TZ": "UTC"},
                  "append_env": True},
    tags=["cvseg"],
) as dag:
    previous = BashOperator(task_id="fetch_jars", bash_command=" ".join(shlex.quote(a) for a in FETCH_JARS))
    for step, arguments in COMMANDS.items():
        task = BashOperator(task_id=step, bash_command="cvseg " + " ".join(
            a if a.startswith("{{") else shlex.quote(a) for a in arguments))
        if previous is not None:
            previous >> task
        previous = task
