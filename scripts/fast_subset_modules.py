"""Which project modules the fast test subset (`pytest -m "not slow"`) exercises.

Runs the subset under coverage (in the pytest process: Ray workers and subprocesses are not
measured) and lists every module of cluster_train/ and data_prep/ with the share of its lines that
ran and whether any function or method body ran (not only the import-time lines: definitions,
constants). Exit status 1 if a module has no body line run, so a marker change that leaves a module
untested by the fast path is seen. Coverage comes with the `test` extra:

    .venv/bin/python scripts/fast_subset_modules.py [extra pytest arguments]
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster_train", "data_prep")


def body_lines(path: Path) -> set[int]:
    """Line numbers of the statements inside function and method bodies (what runs on a call)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # the docstring
            for statement in body:
                lines.update(range(statement.lineno, (statement.end_lineno or statement.lineno) + 1))
    return lines


def main(extra: list[str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        data, report = Path(folder) / ".coverage", Path(folder) / "coverage.json"
        source = ",".join(PACKAGES)
        subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data}", f"--source={source}",
                        "-m", "pytest", "-m", "not slow", "-q", "-p", "no:cacheprovider", *extra], cwd=REPO)
        subprocess.run([sys.executable, "-m", "coverage", "json", f"--data-file={data}", "-o", str(report),
                        "--quiet"], cwd=REPO, check=True)
        files = json.loads(report.read_text())["files"]
    executed = {str((REPO / name).resolve()): set(entry["executed_lines"]) for name, entry in files.items()}
    missing = []
    print(f"\n{'module':48} {'lines run':>9}  bodies run")
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            ran = executed.get(str(path.resolve()), set())
            bodies = body_lines(path)
            total = len(files.get(str(path.relative_to(REPO)), {}).get("executed_lines", [])) + len(
                files.get(str(path.relative_to(REPO)), {}).get("missing_lines", []))
            share = f"{len(ran) / total:.0%}" if total else "-"
            body_ran = len(ran & bodies)
            print(f"{str(path.relative_to(REPO)):48} {share:>9}  {body_ran}/{len(bodies)}")
            if bodies and not body_ran:
                missing.append(str(path.relative_to(REPO)))
    if missing:
        print("\nno function body run by the fast subset:", *missing, sep="\n  ")
        return 1
    print("\nevery module with functions has some run by the fast subset")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
