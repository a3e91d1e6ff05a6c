"""The layers the README's architecture section draws, checked on the import statements (top-level and
inside functions): a package imports only the packages below it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# package -> the project packages it may import
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "datagen": {"core"},
    "pipelines": {"core", "models"},
    "report": {"core", "pipelines"},
    "jobs": {"core", "models", "pipelines", "report", "datagen"},
    "cvseg": {"core", "models", "pipelines", "report", "datagen", "jobs"},
}
# the pyfunc MLflow serves is logged as code with each model version: old versions load it by this
# path, so it stays in core and reaches models lazily (inside its methods)
EXCEPTIONS = {("core/mlflow_model.py", "models")}


def _imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


def test_every_package_imports_only_the_layers_below_it():
    found = []
    for package, allowed in ALLOWED.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, package
        for path in files:
            relative = path.relative_to(ROOT).as_posix()
            for target in _imported_packages(path) - allowed - {package}:
                if (relative, target) not in EXCEPTIONS:
                    found.append(f"{relative} imports {target}")
    assert found == []


def test_the_rule_sees_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from jobs.cli import main\n    import pipelines.ltv\n", encoding="utf-8")
    assert _imported_packages(module) == {"jobs", "pipelines"}
