"""The manifest schema: row checks and their messages, merging, the Arrow table, the listing hash."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pyarrow as pa
import pytest

from data_prep.manifest import (
    SPLITS,
    ManifestError,
    Utterance,
    check_columns,
    check_row,
    listing_hash,
    manifest_from_table,
    manifest_table,
    merge_manifests,
)


def utt(id: str, split: str = "train", **labels) -> Utterance:
    return Utterance(id=id, audio=f"/data/{id}.wav", split=split, **labels)


def test_check_row_parses_text_cells():
    row = check_row(
        {"id": " a1 ", "audio": "/x/a1.wav", "split": "train", "arousal": "4.5", "dominance": "1",
         "valence": "7.0", "category": "", "speaker": "  ", "duration": "3.25"},
        "m.csv", 2,
    )
    assert row == Utterance("a1", "/x/a1.wav", "train", 4.5, 1.0, 7.0, None, None, 3.25)
    assert row.labelled
    assert not check_row({"id": "b", "audio": "/b.wav", "split": "unlabeled", "arousal": 2.0}, "m.csv", 3).labelled


@pytest.mark.parametrize(
    "change, column, fragment",
    [
        ({"arousal": "9"}, "arousal", "9 is outside the label range [1, 7]"),
        ({"valence": "0.5"}, "valence", "outside the label range"),
        ({"dominance": "high"}, "dominance", "'high' is not a number"),
        ({"arousal": "nan"}, "arousal", "not a finite number"),
        ({"split": "validation"}, "split", "'validation' is not a known split; known splits: " + ", ".join(SPLITS)),
        ({"split": "Train"}, "split", "not a known split"),
        ({"id": " "}, "id", "empty"),
        ({"audio": ""}, "audio", "empty"),
        ({"duration": "-1.5"}, "duration", "-1.5 is not a positive number of seconds"),
        ({"duration": "0"}, "duration", "not a positive number"),
        ({"duration": "3s"}, "duration", "'3s' is not a number"),
    ],
)
def test_check_row_names_source_line_and_column(change, column, fragment):
    values = {"id": "a", "audio": "/a.wav", "split": "train", "arousal": "4", **change}
    with pytest.raises(ManifestError) as error:
        check_row(values, "data/m.csv", 7)
    message = str(error.value)
    assert message.startswith(f"data/m.csv line 7, column '{column}': ")
    assert fragment in message


def test_check_row_uses_the_source_column_names():
    with pytest.raises(ManifestError, match=r"^labels\.csv line 4, column 'EmoAct': 9 is outside"):
        check_row({"id": "a", "audio": "/a.wav", "split": "train", "arousal": "9"}, "labels.csv", 4,
                  columns={"arousal": "EmoAct"})


def test_check_columns():
    check_columns(["id", "audio", "split", "valence"], "m.csv", ("id", "audio", "split"), ("id", "audio", "split", "valence"))
    with pytest.raises(ManifestError) as error:
        check_columns(["id", "split", "arousal"], "m.csv", ("id", "audio", "split"))
    assert str(error.value) == "m.csv line 1, column 'audio': required column is missing; columns found: id, split, arousal"
    with pytest.raises(ManifestError, match="column 'arousl': unknown column.*allowed columns: id, audio, split"):
        check_columns(["id", "audio", "split", "arousl"], "m.csv", ("id", "audio", "split"), ("id", "audio", "split"))
    with pytest.raises(ManifestError, match="column 'split': the column appears more than once"):
        check_columns(["id", "audio", "split", "split"], "m.csv", ("id", "audio", "split"))


def test_merge_sorts_by_id_and_names_both_places_of_a_duplicate():
    merged = merge_manifests([[utt("c"), utt("a")], [utt("b")]])
    assert [u.id for u in merged] == ["a", "b", "c"]
    assert merge_manifests([]) == []
    first = [utt("a"), Utterance("dup", "/one/dup.wav", "train")]
    second = [Utterance("dup", "s3://bucket/dup.flac", "test")]
    with pytest.raises(ManifestError) as error:
        merge_manifests([first, second], ["csv source one.csv", "folder source s3://bucket"])
    message = str(error.value)
    assert "duplicate id 'dup'" in message
    assert "folder source s3://bucket, column 'id' (audio s3://bucket/dup.flac)" in message
    assert "first at csv source one.csv, column 'id' (audio /one/dup.wav)" in message
    with pytest.raises(ManifestError, match="source 2.*source 1"):
        merge_manifests([first, second])


def test_manifest_table_round_trip():
    rows = [
        Utterance("b", "s3://bucket/b.flac", "test", 1.0, 7.0, 3.333333333333333, "angry", "spk 2", 2.5),
        Utterance("a", "/data/a.wav", "unlabeled"),
    ]
    table = manifest_table(rows)
    assert table.column_names == ["id", "audio", "split", "arousal", "dominance", "valence", "category", "speaker", "duration"]
    assert table.schema.field("arousal").type == pa.float64()
    assert table["category"].to_pylist() == ["angry", None]
    assert manifest_from_table(table) == rows
    assert manifest_table([]).num_rows == 0 and manifest_from_table(manifest_table([])) == []


def test_manifest_from_table_validates():
    table = manifest_table([utt("a", arousal=2.0), utt("b", arousal=3.0)])
    bad = table.set_column(3, "arousal", pa.array([2.0, 9.0]))
    with pytest.raises(ManifestError, match=r"^manifest\.parquet row 2, column 'arousal': 9 is outside"):
        manifest_from_table(bad, "manifest.parquet")
    duplicated = pa.concat_tables([table, table.slice(0, 1)])
    with pytest.raises(ManifestError, match=r"row 3, column 'id': duplicate id 'a'; first at .* row 1"):
        manifest_from_table(duplicated)
    with pytest.raises(ManifestError, match="column 'split': required column is missing"):
        manifest_from_table(table.drop_columns(["split"]))


def test_listing_hash_is_canonical():
    rows = [utt(f"u{i:03d}", arousal=1 + i / 10, valence=4.0, dominance=2.0, category="happy") for i in range(40)]
    rows += [utt("zz", split="unlabeled")]
    reference = listing_hash(rows)
    assert len(reference) == 64 and int(reference, 16) >= 0
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert listing_hash(shuffled) == reference
    # Pinned: the canonical text it hashes (format line, then one JSON list per row in id order,
    # fields in schema order without audio), so the value is the same on every run and machine.
    canonical = (
        "deepemocluster-manifest/1\n"
        '["a","train",2.5,null,null,null,null,null]\n'
        '["b","unlabeled",null,null,null,"angry",null,1.5]\n'
    )
    pinned = [utt("b", split="unlabeled", category="angry", duration=1.5), utt("a", arousal=2.5)]
    assert listing_hash(pinned) == hashlib.sha256(canonical.encode()).hexdigest()
    assert listing_hash(pinned) == "950dac255d501148f3e8f60776767effad0652cdf60eb586ff200e3c2a7cf30b"
    # Where the audio lives is not part of it; everything a row says about the utterance is.
    moved = [dataclasses.replace(r, audio=r.audio.replace("/data/", "gs://elsewhere/")) for r in rows]
    assert listing_hash(moved) == reference
    for change in ({"arousal": 1.0000001}, {"split": "test"}, {"category": "sad"}, {"speaker": "x"},
                   {"duration": 2.0}, {"id": "u000b"}, {"valence": None}):
        changed = [dataclasses.replace(rows[0], **change)] + rows[1:]
        assert listing_hash(changed) != reference, change
    assert listing_hash(rows[1:]) != reference


def test_utterance_is_frozen():
    row = utt("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.split = "test"  # type: ignore[misc]
