"""pyproject.toml declares what the code imports and nothing it does not, and no install set
installs the `faiss` module twice (faiss-cpu and faiss-gpu both provide it)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CODE = ["data_prep", "cluster_train", "jobs", "bench", "scripts", "tests"]
RUN_FROM_THE_VENV = [REPO / "infra" / "render.py"]  # infra/README.md runs it beside the project
FAISS = {"faiss-cpu", "faiss-gpu"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement (`ray[train]==2.60.0` -> `ray`)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()).lower()


def _names(requirements: list[str]) -> set[str]:
    return {_name(r) for r in requirements}


def _imports() -> dict[str, list[str]]:
    """Top-level module -> the files importing it, for every import that is neither the standard
    library's nor the project's own."""
    files = [p for folder in CODE for p in (REPO / folder).rglob("*.py")] + RUN_FROM_THE_VENV
    local = {*CODE, *(p.stem for p in files)}
    found: dict[str, list[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared_and_every_runtime_dependency_imported() -> None:
    declared = _names(PROJECT["dependencies"]).union(*map(_names, PROJECT["optional-dependencies"].values()))
    providers = importlib.metadata.packages_distributions()
    imports = _imports()
    undeclared = {module: files[:3] for module, files in imports.items()
                  if not {_name(d) for d in providers.get(module, [module])} & declared}
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"
    imported = {_name(d) for module in imports for d in providers.get(module, [])}
    unused = sorted(_names(PROJECT["dependencies"]) - imported)
    assert not unused, f"pyproject.toml's dependencies that no project code imports: {unused}"


def test_no_install_set_installs_faiss_twice_and_setup_installs_one() -> None:
    base = _names(PROJECT["dependencies"])
    extras = {extra: _names(requirements) for extra, requirements in PROJECT["optional-dependencies"].items()}
    assert not base & FAISS, "faiss in the base dependencies: the gpu extra would install it a second time"
    assert {extra for extra, names in extras.items() if names & FAISS} == {"cpu", "gpu"}
    for extra, names in extras.items():
        assert len(names & FAISS) <= 1, f"extra {extra!r} installs {sorted(names & FAISS)}"
    (installed,) = re.findall(r'pip install .*-e "\.\[([a-z,]+)\]"', (REPO / "scripts" / "setup.sh").read_text())
    chosen = base.union(*(extras[extra] for extra in installed.split(",")))
    assert chosen & FAISS == {"faiss-cpu"}, f"scripts/setup.sh installs .[{installed}]"


def test_without_faiss_the_import_error_names_both_extras() -> None:
    """One module imports faiss (clustering/kmeans.py); with neither extra installed it says which to install."""
    assert _imports()["faiss"] == ["cluster_train/clustering/kmeans.py"]
    blocked = "import sys; sys.modules['faiss'] = None; import cluster_train.clustering.kmeans"  # as if not installed
    done = subprocess.run([sys.executable, "-c", blocked], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert re.search(r"ImportError: faiss is not installed: .*\.\[cpu\].*faiss-cpu.*\.\[gpu\].*faiss-gpu", done.stderr), \
        done.stderr[-2000:]
