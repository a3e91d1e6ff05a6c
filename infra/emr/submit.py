"""Start the nightly cvseg pipeline on EMR Serverless with boto3: one job run per step, in order.

    python infra/emr/submit.py --as-of 2026-09-30              # every step, waiting for each
    python infra/emr/submit.py --steps score,segments,export   # a subset (committed steps are skipped anyway)
    python infra/emr/submit.py --dry-run                       # print the StartJobRun requests only

The date is resolved once here (default: yesterday in --timezone) and passed to every step, so a
re-submission of a failed night resumes the same date. Credentials: boto3's standard chain.
Exit code 0 when every run succeeded, 1 when one failed (its state details are printed).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

DEFINITION = Path(__file__).resolve().parent / "job_run.json"
TERMINAL = {"SUCCESS", "FAILED", "CANCELLED"}


def load_definition(path: Path = DEFINITION) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def build_requests(definition: dict, as_of: dt.date, steps: list[str] | None = None) -> list[dict]:
    """StartJobRun keyword arguments for each selected step, in pipeline order."""
    known = [s["name"] for s in definition["steps"]]
    unknown = [s for s in steps or [] if s not in known]
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}; steps are: {', '.join(known)}")
    requests = []
    for step in definition["steps"]:
        if steps and step["name"] not in steps:
            continue
        arguments = [a.replace("{as_of}", as_of.isoformat()) for a in step["entryPointArguments"]]
        requests.append({
            "applicationId": definition["applicationId"],
            "executionRoleArn": definition["executionRoleArn"],
            "name": f"cvseg-{as_of.isoformat()}-{step['name']}",
            "jobDriver": {"sparkSubmit": {"entryPoint": definition["entryPoint"],
                                          "entryPointArguments": arguments,
                                          "sparkSubmitParameters": definition["sparkSubmitParameters"]}},
            "configurationOverrides": {"monitoringConfiguration": {
                "s3MonitoringConfiguration": {"logUri": definition["logUri"]}}},
        })
    return requests


def wait(client, application_id: str, job_run_id: str, poll_seconds: float) -> dict:
    while True:
        run = client.get_job_run(applicationId=application_id, jobRunId=job_run_id)["jobRun"]
        if run["state"] in TERMINAL:
            return run
        time.sleep(poll_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--as-of", type=dt.date.fromisoformat, help="YYYY-MM-DD (default: yesterday in --timezone)")
    parser.add_argument("--timezone", default="Asia/Tokyo", help="business timezone for the default date")
    parser.add_argument("--steps", help="comma-separated subset of the steps")
    parser.add_argument("--definition", type=Path, default=DEFINITION)
    parser.add_argument("--region", help="AWS region (default: the definition's region)")
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument("--no-wait", action="store_true", help="start the first step only and return")
    parser.add_argument("--dry-run", action="store_true", help="print the requests, call nothing")
    args = parser.parse_args(argv)

    as_of = args.as_of or (dt.datetime.now(ZoneInfo(args.timezone)).date() - dt.timedelta(days=1))
    definition = load_definition(args.definition)
    requests = build_requests(definition, as_of, [s for s in (args.steps or "").split(",") if s])
    if args.dry_run:
        print(json.dumps(requests, indent=2))
        return 0
    import boto3

    client = boto3.client("emr-serverless", region_name=args.region or definition.get("region"))
    for request in requests:
        started = client.start_job_run(**copy.deepcopy(request))
        print(f"{request['name']}: job run {started['jobRunId']} started", flush=True)
        if args.no_wait:
            return 0
        run = wait(client, request["applicationId"], started["jobRunId"], args.poll_seconds)
        print(f"{request['name']}: {run['state']} {run.get('stateDetails', '')}".rstrip(), flush=True)
        if run["state"] != "SUCCESS":
            print(f"error: step {request['name']} ended {run['state']}; fix it and run this script again with "
                  f"--as-of {as_of} (committed steps are skipped)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
