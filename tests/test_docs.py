"""docs/CONFIG.md and docs/BENCHMARKS.md are generated (`scripts/reference_docs.py`): the committed
files equal what the code and bench/results/ give now, and what the generator writes follows a
change of either."""

from __future__ import annotations

import importlib.util
import json
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
