"""docs/CONFIG.md and docs/BENCHMARKS.md, generated from the code so that they cannot drift from it:
the config reference from the config dataclasses (every key, its type, its default and the comment
the code gives it), the benchmarks page from bench/results/*.json, each bench script's docstring and
bench/notes/<result>.md (what a result showed, in prose; a note with no result is a section of its own),
and the README's table of the scale rehearsal from bench/results/scale.json.

    python scripts/reference_docs.py            # write both
    python scripts/reference_docs.py --check    # exit 1 naming a file that differs from the code

tests/test_docs.py fails when a committed file differs from what this writes.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import MISSING

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIG_DOC = REPO / "docs" / "CONFIG.md"
BENCHMARKS_DOC = REPO / "docs" / "BENCHMARKS.md"
README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"
NOTES = REPO / "bench" / "notes"


# ---- the config reference -------------------------------------------------------------------------

def _class_node(cls: type) -> tuple[ast.ClassDef, list[str], str]:
    source = textwrap.dedent(inspect.getsource(cls))
    [node] = ast.parse(source).body
    return node, source.splitlines(), source


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment the class's source gives it: the comment lines right above the
    field and the one at the end of its line, joined; "one of NAME", NAME a tuple of the class's
    module, becomes the values it holds."""
    node, lines, source = _class_node(cls)
    trailing: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and lines[token.start[0] - 1][:token.start[1]].strip():
            trailing[token.start[0]] = token.string.lstrip("#").strip()
    module = vars(sys.modules[cls.__module__])

    def named_values(match: re.Match) -> str:
        values = module.get(match.group(1))
        return f"one of {', '.join(map(str, values))}" if isinstance(values, tuple) else match.group(0)

    comments = {}
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        above, row = [], statement.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        end = trailing.get(statement.end_lineno)
        text = " ".join(" ".join([*above, *([end] if end else [])]).split())
        comments[statement.target.id] = re.sub(r"one of ([A-Z_]+)\b", named_values, text)
    return comments


def class_summary(cls: type) -> str:
    """The first paragraph of the class's own docstring ("" without one)."""
    docstring = ast.get_docstring(_class_node(cls)[0]) or ""
    return " ".join(docstring.split("\n\n")[0].split())


def _config_class(annotation: Any) -> type | None:
    """The config dataclass a field holds, directly, optionally (`X | None`) or as a list's items."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        found = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text).replace("NoneType", "None")  # no module paths


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(item: dataclasses.Field, instance: Any) -> Any:
    """The field's default: the value in `instance` (the default its parent builds) when there is one."""
    if instance is not None:
        return getattr(instance, item.name)
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return MISSING


def config_rows(cls: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, what it is) for every key of `cls`, nested configs expanded with the
    defaults their parent gives them; a nested config with a docstring gets a row of its own."""
    hints, comments, rows = typing.get_type_hints(cls), field_comments(cls), []
    for item in dataclasses.fields(cls):
        key, hint, default = f"{prefix}{item.name}", hints[item.name], _default(item, instance)
        nested = _config_class(hint)
        if nested is None:
            shown = "required" if isinstance(default, str) and default == MISSING else f"`{_yaml(default)}`"
            rows.append((key, _type_name(hint), shown, comments[item.name]))
            continue
        is_list = typing.get_origin(hint) is list
        note = " ".join(filter(None, [class_summary(nested), comments[item.name]]))
        if is_list or default is None or note:
            shown = f"`{_yaml([])}`" if is_list else f"`{_yaml(None)}`" if default is None else "section"
            rows.append((key, _type_name(hint), shown, note))
        rows.extend(config_rows(nested, f"{key}[]." if is_list else f"{key}.",
                                default if dataclasses.is_dataclass(default) else None))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_reference() -> str:
    """docs/CONFIG.md: each job's config keys as the dataclasses define them."""
    from cluster_train.experiments.sweep import SweepConfig
    from cluster_train.train.config import DERIVED_KEYS, TrainConfig
    from data_prep.config import PrepConfig

    sections = [
        ("Training", "jobs/train.py --config configs/train/<name>.yaml", TrainConfig,
         "`cluster_train/train/config.py` and the classes it nests. A file in `configs/train/` sets some "
         "keys, a recipe (`recipe=`) others, `key=value` arguments any."),
        ("Prep", "jobs/prep.py --config configs/prep/<name>.yaml", PrepConfig, "`data_prep/config.py`."),
        ("Sweeps and searches", "jobs/sweep.py --config configs/sweep/<name>.yaml", SweepConfig,
         "`cluster_train/experiments/sweep.py`. `overrides`, `grid` and `points` take training keys."),
    ]
    out = ["# Config reference", "",
           "Generated by `python scripts/reference_docs.py` from the config dataclasses; "
           "`tests/test_docs.py` fails when it differs from them. A wrong key or value fails before Ray "
           "starts, with the key named.", ""]
    for title, command, cls, where in sections:
        out += [f"## {title}", "", f"`{command} [key=value ...]`: {where}", "",
                "| key | type | default | what it is |", "|---|---|---|---|"]
        for key, kind, default, note in config_rows(cls):
            if cls is TrainConfig and key in DERIVED_KEYS:
                default, note = "derived", f"set from elsewhere: {DERIVED_KEYS[key]}"
            out.append(f"| `{key}` | `{_cell(kind)}` | {_cell(default)} | {_cell(note)} |")
        out.append("")
    return "\n".join(out)


# ---- the benchmarks page --------------------------------------------------------------------------

def _bench_script(command: str) -> Path | None:
    for word in command.split():
        if word.startswith("bench/") and word.endswith((".py", ".sh")):
            return REPO / word
    return None


def _what_it_measures(script: Path | None) -> str:
    if script is None or script.suffix != ".py" or not script.is_file():
        return ""
    docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
    return " ".join(docstring.split("\n\n")[0].split())


def _machine(details: dict[str, Any]) -> str:
    for key in ("machine", "device", "cpu"):
        value = details.get(key)
        if isinstance(value, dict):
            return ", ".join(f"{k} {v}" for k, v in value.items() if not isinstance(v, (dict, list)))
        if value:
            return str(value)
    return ""


def _note(notes: Path, name: str) -> list[str]:
    path = notes / f"{name}.md"
    return [path.read_text().strip(), ""] if path.is_file() else []


def benchmarks_page(results: Path = RESULTS, notes: Path = NOTES) -> str:
    """docs/BENCHMARKS.md: every `results`/*.json with its command, what it measures, its figure
    against the baseline measured in the same run, the machine and its note from `notes`; then the
    notes that belong to no result."""
    out = ["# Benchmarks", "",
           "Generated by `python scripts/reference_docs.py` from `bench/results/*.json` (each written by "
           "the command shown), each bench script's docstring and `bench/notes/*.md`; `tests/test_docs.py` "
           "fails when it differs from them. ratio = ours / the baseline measured in the same run. "
           "Everything else a run measured, per-commit figures included, is in its JSON's `details`.", "",
           "| result | figure | baseline | ratio |", "|---|---|---|---|"]
    found = [(path, json.loads(path.read_text())) for path in sorted(results.glob("*.json"))]
    for path, result in found:
        out.append(f"| [{path.stem}](#{path.stem}) | {result['value']} {_cell(result['unit'])} "
                   f"| {result['baseline_value']} | {result['ratio']} |")
    out.append("")
    for path, result in found:
        details = result.get("details", {})
        script = _bench_script(result["command"])
        out += [f"## {path.stem}", ""]
        what = _what_it_measures(script)
        if what:
            out += [what, ""]
        out += [f"- **{result['value']} {result['unit']}**",
                f"- baseline: {result['baseline_value']}, {result['baseline']}",
                f"- ratio: {result['ratio']}",
                f"- command: `{result['command']}`"]
        machine = _machine(details)
        if machine:
            out.append(f"- machine: {machine}")
        if details.get("measured"):
            out.append(f"- measured: {_yaml(details['measured'])}")
        out.append(f"- file: [`bench/results/{path.name}`](../bench/results/{path.name})")
        out.append("")
        out += _note(notes, path.stem)
    results_named = {path.stem for path, _ in found}
    for path in sorted(notes.glob("*.md")):
        if path.stem not in results_named:
            out += [f"## {path.stem}", ""] + _note(notes, path.stem)
    return "\n".join(out)


# ---- the README's scale table -----------------------------------------------------------------------

SCALE_TABLE = re.compile(r"(<!-- scale table: .*? -->\n)(.*?)(\n<!-- end of scale table -->)", re.S)


def _ccc(value: float) -> str:
    text = f"{value:.2f}".replace("0.", ".", 1)
    return ".00" if text == "-.00" else text


def scale_table(result: dict) -> str:
    """The rehearsal's figures per scale, as README.md shows them: each cell from `result`
    (bench/results/scale.json), "pending" where that stage has not run at that scale."""
    measured = result["details"]["measured"]
    scales = sorted({float(key.split("@")[1]) for key in measured})
    segments = result["details"]["full_segments"]

    def row(label: str, stage: str, cell) -> str:
        cells = [cell(measured[f"{stage}@{scale:g}"]) if f"{stage}@{scale:g}" in measured else "pending"
                 for scale in scales]
        return f"| {label} | " + " | ".join(cells) + " |"

    def peak(memory: dict, role: str) -> float:
        return memory[f"peak_rss_{role}_mb"]

    def prep_total(prep: dict) -> str:
        first, resumed = prep["memory_first_run"], prep["memory_resumed_run"]
        total = max(peak(first, "total"), peak(resumed, "total")) / 1000
        return f"{total:.1f} GB ({max(peak(first, 'driver'), peak(resumed, 'driver')) / 1000:.2f})"

    def epochs(key: str) -> callable:
        return lambda train: ", ".join(f"{epoch[key]:,.0f}" for epoch in train["epochs"])

    header = "| | " + " | ".join(f"{scale:.0%} ({scale * segments:,.0f} segments)" for scale in scales) + " |"
    rows = [
        header, "|---|" + "---|" * len(scales),
        row("prep: seconds (killed + resumed run)", "prep", lambda p: f"{p['seconds']:,.0f}"),
        row("prep: shards written, rewritten on resume", "prep",
            lambda p: f"{p['shards']:,}, {p['shards_rewritten_on_resume']}"),
        row("prep: disk", "prep", lambda p: f"{p['disk_gb']:.2f} GB" if p["disk_gb"] < 10 else f"{p['disk_gb']:.1f} GB"),
        row("prep: peak RSS, all processes (of it the driver)", "prep", prep_total),
        row("stage-1 batch of 64: shards it draws from, streamed / read in order", "mixing",
            lambda m: f"{m['shards_per_batch_streamed']['mean']:.1f} / {m['shards_per_batch_in_order']['mean']:.1f}"),
        row("training: epoch seconds", "train", epochs("epoch_s")),
        row("training: chunks clustered per epoch", "train", lambda t: f"{t['epochs'][0]['clustered_chunks']:,}"),
        row("training: stage-1 chunks/s (both workers)", "train", epochs("stage1_chunks_per_s")),
        row("peak RSS of a training worker", "train", lambda t: f"{peak(t['memory'], 'train_worker') / 1000:.2f} GB"),
        row("peak RSS of the K-means actor", "train", lambda t: f"{peak(t['memory'], 'kmeans_actor'):,.0f} MB"),
        row("peak RSS of the driver", "train", lambda t: f"{peak(t['memory'], 'driver'):,.0f} MB"),
        row("object-store spill", "train", lambda t: f"{t['memory']['object_store_spill_mb']:,.0f} MB"),
        row("test1 CCC arousal / dominance / valence", "train",
            lambda t: " / ".join(_ccc(t["scores"][f"test1/ccc_{a}"]) for a in ("arousal", "dominance", "valence"))),
    ]
    return "\n".join(rows)


def readme(results: Path = RESULTS) -> str:
    """README.md with its scale table made from `results`/scale.json (between its two markers)."""
    text = README.read_text()
    table = scale_table(json.loads((results / "scale.json").read_text()))
    if not SCALE_TABLE.search(text):
        raise SystemExit("README.md: the scale table's markers are missing")
    return SCALE_TABLE.sub(lambda m: m.group(1) + table + m.group(3), text)


GENERATED = {CONFIG_DOC: config_reference, BENCHMARKS_DOC: benchmarks_page, README: readme}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
    args = parser.parse_args(argv)
    stale = []
    for path, generate in GENERATED.items():
        text = generate()
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    for path in stale:
        print(f"{path.relative_to(REPO)} differs from the code: run python scripts/reference_docs.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
