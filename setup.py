"""Packaging for the customer-value segmentation engine (console script: ``cvseg``)."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = (ROOT / "core" / "VERSION").read_text().strip()

# Spark line pinned to Databricks Runtime 17.3 LTS / EMR 7.x-on-Spark-4 (Apache Spark 4.0).
SPARK = "pyspark>=4.0.1,<4.1"

setup(
    name="cvseg",
    version=VERSION,
    description="Customer 6-month value, stable segments and trends on Apache Spark",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["cvseg", "cvseg.*", "core", "core.*", "jobs", "jobs.*", "pipelines",
                                    "pipelines.*", "models", "models.*", "report", "report.*", "datagen",
                                    "datagen.*", "conf", "conf.*"]),
    package_data={"core": ["VERSION", "jars.lock", "log4j2.properties"],
                  "conf": ["*.yaml", "examples/*.yaml", "README.md"]},
    install_requires=[
        SPARK,
        "delta-spark>=4.0,<4.1",   # native Delta when the session has Delta's jars
        "deltalake>=1.1,<2",       # same Delta format through delta-rs when it has not
        "pyarrow>=15",
        # pandas 3's default Arrow-backed `str` columns make Spark 4.0's createDataFrame fall back
        # to row-by-row conversion, and MLflow 3 warns on them; Databricks 17.3 ships pandas 2.x.
        "pandas>=2.2,<3",
        "numpy>=1.26",
        "scipy>=1.11",
        # compiles the value intervals' count series (models/intervals.py): ~8x the numpy loop
        "numba>=0.60",
        "lifetimes==0.11.3",
        "scikit-learn>=1.4",
        "mlflow>=3.1,<4",
        "boto3>=1.34",
        "pydantic>=2.6,<3",
        "PyYAML>=6",
        "python-dateutil>=2.8",
        "matplotlib>=3.8",
        "matplotlib-fontja>=1.1,<2",  # ships the IPAexGothic TTF: Japanese text in charts and PDF
        "reportlab>=4.2,<6",       # A4 PDF report (pure pip, embeds the TTF)
        "psutil>=5.9",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.6",     # the suite on both cores (./dev test: -n 2), CI's 30-minute budget
            "chispa>=0.10",
            "moto[s3,server]>=5",
            "pypdf>=4",
            "pypdfium2>=4",          # renders PDF pages to images in tests where poppler is absent
        ],
    },
    entry_points={"console_scripts": ["cvseg=jobs.cli:main"]},
)
