"""docs/CONFIG.md and docs/BENCHMARKS.md are generated (`scripts/reference_docs.py`): the committed
files equal what the code and bench/results/ give now, and what the generator writes follows a
change of either."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reference_docs", REPO / "scripts" / "reference_docs.py")
reference_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_docs)

COLOURS = ("red", "green")


@dataclass(kw_only=True)
class _Inner:
    """A nested section."""

    size: int = 3  # how big


@dataclass(kw_only=True)
class _Outer:
    # The colour of
    # the thing.
    colour: str = "red"  # one of COLOURS
    inner: _Inner = field(default_factory=lambda: _Inner(size=7))
    names: list[str] = field(default_factory=lambda: ["a", "b"])
    limit: float | None = None


def test_the_committed_docs_are_what_the_code_and_the_results_give():
    for path, generate in reference_docs.GENERATED.items():
        assert path.read_text() == generate(), f"{path.name} differs from the code: run python scripts/reference_docs.py"
    assert reference_docs.main(["--check"]) == 0


def test_a_key_shows_its_type_default_and_comment_with_the_defaults_its_parent_gives():
    rows = {key: (kind, default, note) for key, kind, default, note in reference_docs.config_rows(_Outer)}
    assert rows["colour"] == ("str", "`red`", "The colour of the thing. one of red, green")
    assert rows["inner"] == ("_Inner", "section", "A nested section.")
    assert rows["inner.size"] == ("int", "`7`", "how big")  # the parent's default, not the class's 3
    assert rows["names"] == ("list[str]", "`[a, b]`", "")
    assert rows["limit"] == ("float | None", "`null`", "")


def test_every_training_key_is_in_the_reference_and_a_changed_result_changes_the_page(tmp_path):
    from cluster_train.train.config import TrainConfig

    reference = reference_docs.config_reference()
    for key in ("data.shuffle_buffer_rows", "clustering.mode", "optim.encoder.lr", "precise_bn.utterances", "seed"):
        assert f"| `{key}` |" in reference, key
    assert "one of gather, sample, allreduce" in reference  # `one of MODES` written out
    assert len([line for line in reference.splitlines() if line.startswith("| `")]) > len(
        [f for f in TrainConfig.__dataclass_fields__])

    shutil.copy(REPO / "bench" / "results" / "train.json", tmp_path / "train.json")
    before = reference_docs.benchmarks_page(tmp_path)
    result = json.loads((tmp_path / "train.json").read_text())
    assert f"**{result['value']} {result['unit']}**" in before and "`python bench/train_bench.py" in before
    result["value"] = 12345.6
    (tmp_path / "train.json").write_text(json.dumps(result))
    after = reference_docs.benchmarks_page(tmp_path)
    assert "**12345.6 " in after and "**12345.6 " not in before


def test_a_results_note_follows_its_figures_and_a_note_without_a_result_has_its_own_section(tmp_path):
    results, notes = tmp_path / "results", tmp_path / "notes"
    results.mkdir(), notes.mkdir()
    shutil.copy(REPO / "bench" / "results" / "train.json", results / "train.json")
    (notes / "train.md").write_text("One worker kept up with the loop.\n")
    (notes / "test_suite.md").write_text("The suite took a while.\n")
    page = reference_docs.benchmarks_page(results, notes)
    train = page.index("## train")
    assert page.index("- file: [`bench/results/train.json`]") < page.index("One worker kept up") > train
    assert page.index("## test_suite\n\nThe suite took a while.") > page.index("One worker kept up")
    assert "## test_suite" not in reference_docs.benchmarks_page(results, tmp_path / "no-notes")


def test_every_relative_link_of_the_user_docs_points_at_a_file():
    pages = [REPO / "README.md", REPO / "infra" / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "docs" / "results").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_the_readmes_scale_table_follows_scale_json():
    result = json.loads((REPO / "bench" / "results" / "scale.json").read_text())
    table = reference_docs.scale_table(result)
    assert table in (REPO / "README.md").read_text()
    measured = result["details"]["measured"]
    worker = measured["train@0.1"]["memory"]["peak_rss_train_worker_mb"]
    assert "| peak RSS of a training worker | " in table and f"{worker / 1000:.2f} GB" in table

    del measured["train@0.1"]
    measured["prep@0.1"]["seconds"] = 4321.0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in
            reference_docs.scale_table(result).splitlines()[2:]}
    assert rows["prep: seconds (killed + resumed run)"][1] == "4,321"
    assert rows["peak RSS of a training worker"][1] == "pending"  # no training at 10%: not a stale figure
