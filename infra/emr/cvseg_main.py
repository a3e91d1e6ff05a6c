"""spark-submit entry point on EMR / EMR Serverless: the `cvseg` command line, arguments passed through.

Upload next to the packed environment (infra/README.md), e.g.
s3://bucket/cvseg/artifacts/cvseg_main.py; arguments are those of `cvseg`, e.g. `run --as-of 2026-09-30`.
"""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
