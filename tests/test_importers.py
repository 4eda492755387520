"""Importers on real audio files: MSP-Podcast layout, RAVDESS sample, generic CSV, folders, listings."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf

from data_prep.audio import AudioRejected
from data_prep.config import SOURCE_KINDS, PrepConfig, SourceConfig, load_config
from data_prep.importers import (
    AUDIO_EXTENSIONS,
    IMPORTERS,
    SourceSpec,
    build_manifest,
    import_csv,
    import_folder,
    import_msp_podcast,
    import_ravdess,
)
from data_prep.manifest import SPLITS, ManifestError, Utterance
from data_prep.shards import load_frames, reject_reason
from data_prep.storage import read_bytes

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ravdess_sample"
MSP_HEADER = ["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"]


def write_rows(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_wav(source: Path, target: Path) -> Path:
    """A real sample FLAC re-encoded as WAV (or whatever the target's ending says)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    wave, rate = sf.read(source, dtype="float32")
    sf.write(target, wave, rate)
    return target


# --- MSP-Podcast --------------------------------------------------------------------------------

MSP_ROWS = [
    ["MSP-PODCAST_0001_0001.wav", "A", "6.2", "3.0", "5.4", "127", "Female", "Train"],
    ["MSP-PODCAST_0001_0002.wav", "N", "4", "4.2", "4", "127", "Female", "Development"],
    ["MSP-PODCAST_0002_0001.wav", "H", "5.0", "6.6", "5.2", "0031", "Male", "Test1"],
    ["MSP-PODCAST_0003_0001.wav", "S", "2.4", "1.8", "2.6", "Unknown", "Unknown", "Test2"],
    ["MSP-PODCAST_0004_0001.wav", "X", "3.5", "3.5", "3.5", "55", "Male", "Test3"],
]


def msp_release(root: Path, rows: list[list[str]] = MSP_ROWS, header: list[str] = MSP_HEADER,
                extra_audio: tuple[str, ...] = ()) -> Path:
    """A small MSP-Podcast release tree: real speech as WAV in Audios/, the labels CSV in Labels/."""
    flacs = sorted(SAMPLE.glob("Actor_01/*.flac"))
    names = [row[0] for row in MSP_ROWS] + list(extra_audio)
    for flac, name in zip(flacs, names):
        write_wav(flac, root / "Audios" / name)
    write_rows(root / "Labels" / "labels_consensus.csv", header, rows)
    return root


def test_msp_podcast_labels_splits_ids_speakers(tmp_path):
    root = msp_release(tmp_path / "MSP-Podcast")
    manifest = import_msp_podcast(str(root))
    assert [u.id for u in manifest] == [
        "MSP-PODCAST_0001_0001", "MSP-PODCAST_0001_0002", "MSP-PODCAST_0002_0001",
        "MSP-PODCAST_0003_0001", "MSP-PODCAST_0004_0001",
    ]
    assert [u.split for u in manifest] == ["train", "development", "test1", "test2", "test3"]
    first = manifest[0]
    assert (first.arousal, first.valence, first.dominance) == (6.2, 3.0, 5.4)
    assert (first.category, first.speaker, first.duration) == ("A", "127", None)
    assert manifest[2].speaker == "0031"  # speaker ids stay text
    assert all(u.labelled for u in manifest)
    for u in manifest:
        assert Path(u.audio).is_absolute() and Path(u.audio) == root / "Audios" / f"{u.id}.wav"
        assert sf.info(u.audio).samplerate == 16000


def test_msp_podcast_unlabeled_audio_only_when_asked(tmp_path):
    root = msp_release(tmp_path / "msp", extra_audio=("MSP-PODCAST_0900_0001.wav", "MSP-PODCAST_0900_0002.flac"))
    (root / "Audios" / "notes.txt").write_text("not audio\n")
    assert len(import_msp_podcast(str(root))) == len(MSP_ROWS)
    manifest = import_msp_podcast(str(root), include_unlabeled=True)
    unlabeled = [u for u in manifest if u.split == "unlabeled"]
    assert [u.id for u in unlabeled] == ["MSP-PODCAST_0900_0001", "MSP-PODCAST_0900_0002"]
    assert unlabeled[1].audio == str(root / "Audios" / "MSP-PODCAST_0900_0002.flac")
    assert not any(u.labelled for u in unlabeled)
    assert len(manifest) == len(MSP_ROWS) + 2


def test_msp_podcast_missing_column_is_named(tmp_path):
    header = [c for c in MSP_HEADER if c != "EmoDom"]
    rows = [[v for c, v in zip(MSP_HEADER, row) if c != "EmoDom"] for row in MSP_ROWS]
    root = msp_release(tmp_path / "msp", rows, header)
    with pytest.raises(ManifestError) as error:
        import_msp_podcast(str(root))
    message = str(error.value)
    assert str(root / "Labels" / "labels_consensus.csv") in message
    assert "column 'EmoDom': required column is missing" in message
    assert "columns found: FileName, EmoClass, EmoAct, EmoVal, SpkrID, Gender, Split_Set" in message


def test_msp_podcast_label_out_of_range_names_line_and_column(tmp_path):
    rows = [row[:] for row in MSP_ROWS]
    rows[1][2] = "9"
    root = msp_release(tmp_path / "msp", rows)
    with pytest.raises(ManifestError) as error:
        import_msp_podcast(str(root))
    assert str(error.value) == (
        f"{root / 'Labels' / 'labels_consensus.csv'} line 3, column 'EmoAct': 9 is outside the label range [1, 7]"
    )


def test_msp_podcast_duplicate_file_name(tmp_path):
    rows = MSP_ROWS + [MSP_ROWS[0]]
    root = msp_release(tmp_path / "msp", rows)
    with pytest.raises(ManifestError, match=r"line 7, column 'FileName': duplicate FileName "
                                            r"'MSP-PODCAST_0001_0001.wav'; first at .*line 2"):
        import_msp_podcast(str(root))


def test_msp_podcast_unknown_split_lists_known_ones(tmp_path):
    rows = [row[:] for row in MSP_ROWS]
    rows[3][7] = "Validation"
    root = msp_release(tmp_path / "msp", rows)
    with pytest.raises(ManifestError) as error:
        import_msp_podcast(str(root))
    assert str(error.value).endswith(
        "line 5, column 'Split_Set': 'Validation' is not a known split; "
        "known splits: Train, Development, Test1, Test2, Test3"
    )


def test_msp_podcast_without_labels_file(tmp_path):
    (tmp_path / "msp" / "Audios").mkdir(parents=True)
    with pytest.raises(ManifestError, match=r"labels_consensus\.csv: does not exist"):
        import_msp_podcast(str(tmp_path / "msp"))


# --- RAVDESS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ravdess() -> dict[str, Utterance]:
    manifest = import_ravdess(str(SAMPLE))
    assert [u.id for u in manifest] == sorted(u.id for u in manifest)
    return {u.id: u for u in manifest}


def test_ravdess_sample_counts_and_splits(ravdess):
    assert len(ravdess) == 360
    split_of_actor = {u.speaker: u.split for u in ravdess.values()}
    assert split_of_actor == {
        "Actor_01": "train", "Actor_02": "train", "Actor_17": "development", "Actor_18": "development",
        "Actor_21": "test", "Actor_22": "test",
    }
    assert Counter(u.category for u in ravdess.values()) == {
        "neutral": 24, "calm": 48, "happy": 48, "sad": 48, "angry": 48, "fearful": 48, "disgust": 48, "surprised": 48,
    }
    assert all(u.labelled and u.duration is None for u in ravdess.values())
    for u in ravdess.values():
        assert u.audio == str(SAMPLE / u.speaker / f"{u.id}.flac")


def test_ravdess_labels_from_the_readme_table(ravdess):
    angry_strong = ravdess["03-01-05-02-01-01-01"]
    assert angry_strong.category == "angry"
    assert angry_strong.arousal == pytest.approx(1 + 6 * 0.865)
    assert angry_strong.valence == pytest.approx(1 + 6 * 0.167)
    assert angry_strong.dominance == pytest.approx(1 + 6 * 0.657)
    happy_normal = ravdess["03-01-03-01-02-02-17"]  # normal: midpoint between happy and neutral
    assert happy_normal.arousal == pytest.approx(1 + 6 * (0.735 + 0.184) / 2)
    assert happy_normal.valence == pytest.approx(1 + 6 * (1.000 + 0.469) / 2)
    assert happy_normal.dominance == pytest.approx(1 + 6 * (0.772 + 0.357) / 2)
    assert (happy_normal.split, happy_normal.speaker) == ("development", "Actor_17")
    neutral = ravdess["03-01-01-01-01-01-22"]
    assert (neutral.arousal, neutral.valence, neutral.dominance) == pytest.approx(
        (1 + 6 * 0.184, 1 + 6 * 0.469, 1 + 6 * 0.357))
    assert neutral.split == "test"
    calm_strong = ravdess["03-01-02-02-02-01-02"]
    assert calm_strong.arousal == pytest.approx(1.6) and calm_strong.split == "train"
    # Same emotion and actor, other statement and repetition: same labels.
    assert ravdess["03-01-05-02-02-02-01"].arousal == angry_strong.arousal


def test_ravdess_split_boundaries(tmp_path):
    source = SAMPLE / "Actor_01" / "03-01-08-02-01-01-01.flac"
    expected = {1: "train", 16: "train", 17: "development", 20: "development", 21: "test", 24: "test"}
    for actor in expected:
        target = tmp_path / f"Actor_{actor:02d}" / f"03-01-08-02-01-01-{actor:02d}.flac"
        target.parent.mkdir()
        shutil.copy(source, target)
    manifest = import_ravdess(str(tmp_path))
    assert {int(u.speaker[-2:]): u.split for u in manifest} == expected
    assert {u.category for u in manifest} == {"surprised"}


@pytest.mark.parametrize(
    "name, field, fragment",
    [
        ("03-01-09-01-01-01-01.flac", "emotion (EE)", "'09' is not one of 01, 02, 03, 04, 05, 06, 07, 08"),
        ("03-01-01-02-01-01-01.flac", "intensity (II)", "neutral has normal intensity only"),
        ("03-02-03-01-01-01-01.wav", "vocal channel (VV)", "'02' is not one of 01"),
        ("03-01-03-01-01-01.flac", "file name", "does not have the seven two-digit fields"),
        ("03-01-03-01-01-01-1.flac", "actor (AA)", "'1' is not one of 01, 02"),
        ("03-01-03-01-01-01-05.flac", "actor (AA)", "actor 05 in the name, but the file is in folder Actor_01"),
        ("take3.wav", "file name", "'take3' does not have"),
    ],
)
def test_ravdess_bad_file_name_names_file_and_field(tmp_path, name, field, fragment):
    actor = tmp_path / "ravdess" / "Actor_01"
    actor.mkdir(parents=True)
    shutil.copy(SAMPLE / "Actor_01" / "03-01-01-01-01-01-01.flac", actor / "03-01-01-01-01-01-01.flac")
    shutil.copy(SAMPLE / "Actor_01" / "03-01-01-01-01-01-01.flac", actor / name)
    with pytest.raises(ManifestError) as error:
        import_ravdess(str(tmp_path / "ravdess"))
    assert str(error.value).startswith(f"{actor / name}, field '{field}': ")
    assert fragment in str(error.value)


def test_ravdess_same_name_in_two_formats_is_a_duplicate(tmp_path):
    actor = tmp_path / "ravdess" / "Actor_21"
    source = SAMPLE / "Actor_21" / "03-01-04-02-01-01-21.flac"
    write_wav(source, actor / "03-01-04-02-01-01-21.wav")
    shutil.copy(source, actor / source.name)
    (actor / "README.md").write_text("not audio\n")
    with pytest.raises(ManifestError, match=r"duplicate id '03-01-04-02-01-01-21'"):
        import_ravdess(str(tmp_path / "ravdess"))
    (actor / source.name).unlink()
    [row] = import_ravdess(str(tmp_path / "ravdess"))
    assert row.audio.endswith(".wav") and (row.category, row.split) == ("sad", "test")


# --- generic CSV --------------------------------------------------------------------------------


def test_csv_resolves_paths_and_reads_optional_columns(tmp_path):
    flac = next(SAMPLE.glob("Actor_02/*.flac"))
    write_wav(flac, tmp_path / "corpus" / "audio" / "a.wav")
    path = write_rows(
        tmp_path / "corpus" / "manifest.csv",
        ["id", "audio", "split", "valence", "arousal", "speaker", "duration", "category", "dominance"],
        [
            ["0001", "audio/a.wav", "train", "2.5", " 6 ", "spk1", "3.5", "", "4"],
            ["b", str(flac), "unlabeled", "", "", "", "", "", ""],
            ["c", "s3://bucket/x/c.flac", "test", "1", "7", "", "", "sad", "1.0"],
            ["", "", "", "", "", "", "", "", ""],  # a blank spreadsheet row is skipped
            ["d", "../other/d.wav", "development", "", "", "", "", "", ""],
        ],
    )
    manifest = import_csv(str(path))
    assert [u.id for u in manifest] == ["0001", "b", "c", "d"]
    a, b, c, d = manifest
    assert a == Utterance("0001", str(tmp_path / "corpus" / "audio" / "a.wav"), "train", 6.0, 4.0, 2.5, None, "spk1", 3.5)
    assert Path(a.audio).is_file()
    assert b == Utterance("b", str(flac), "unlabeled")
    assert c.audio == "s3://bucket/x/c.flac" and c.category == "sad" and c.labelled
    assert d.audio == str(tmp_path / "other" / "d.wav")
    rebased = import_csv(str(path), base_dir=str(tmp_path / "elsewhere"))
    assert rebased[0].audio == str(tmp_path / "elsewhere" / "audio" / "a.wav")
    assert rebased[1].audio == str(flac)  # absolute paths stay as they are


def test_csv_only_required_columns(tmp_path):
    path = write_rows(tmp_path / "m.csv", ["split", "audio", "id"], [["test", "x.wav", "x"]])
    assert import_csv(str(path)) == [Utterance("x", str(tmp_path / "x.wav"), "test")]


def test_csv_header_with_excel_byte_order_mark(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffid,audio,split\nx,x.wav,train\n".encode("utf-8"))
    assert [u.id for u in import_csv(str(path))] == ["x"]


def test_csv_unknown_column_is_rejected(tmp_path):
    path = write_rows(tmp_path / "m.csv", ["id", "audio", "split", "arousl"], [["x", "x.wav", "train", "3"]])
    with pytest.raises(ManifestError) as error:
        import_csv(str(path))
    message = str(error.value)
    assert message.startswith(f"{path} line 1, column 'arousl': unknown column(s) 'arousl'")
    assert "allowed columns: id, audio, split, arousal, dominance, valence, category, speaker, duration" in message


@pytest.mark.parametrize(
    "column, value, fragment",
    [
        ("arousal", "high", "'high' is not a number"),
        ("valence", "7.5", "7.5 is outside the label range [1, 7]"),
        ("duration", "-2", "-2 is not a positive number of seconds"),
        ("split", "validation", "known splits: train, development, test, test1, test2, test3, unlabeled"),
        ("audio", "  ", "empty"),
    ],
)
def test_csv_bad_cell_names_line_and_column(tmp_path, column, value, fragment):
    header = ["id", "audio", "split", "arousal", "valence", "duration"]
    rows = [["a", "a.wav", "train", "4", "4", "2"], ["b", "b.wav", "train", "4", "4", "2"]]
    rows[1][header.index(column)] = value
    path = write_rows(tmp_path / "m.csv", header, rows)
    with pytest.raises(ManifestError) as error:
        import_csv(str(path))
    assert str(error.value).startswith(f"{path} line 3, column '{column}': ")
    assert fragment in str(error.value)


def test_csv_structural_mistakes(tmp_path):
    missing = write_rows(tmp_path / "missing.csv", ["id", "split"], [["a", "train"]])
    with pytest.raises(ManifestError, match=r"missing\.csv line 1, column 'audio': required column is missing; "
                                            r"columns found: id, split"):
        import_csv(str(missing))
    duplicate = write_rows(tmp_path / "dup.csv", ["id", "audio", "split"],
                           [["a", "1.wav", "train"], ["b", "2.wav", "train"], ["a", "3.wav", "test"]])
    with pytest.raises(ManifestError, match=r"dup\.csv line 4, column 'id': duplicate id 'a'; first at .*dup\.csv line 2"):
        import_csv(str(duplicate))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('id,audio,split\n"a\nb",a.wav,train\nc,c.wav\n')
    with pytest.raises(ManifestError, match=r"ragged\.csv line 4: 2 cells, but the header has 3 columns"):
        import_csv(str(ragged))  # the quoted id spans lines 2-3, so the short row is on line 4
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ManifestError, match="no header line"):
        import_csv(str(empty))
    header_only = write_rows(tmp_path / "header.csv", ["id", "audio", "split"], [])
    with pytest.raises(ManifestError, match="no utterances found"):
        import_csv(str(header_only))
    with pytest.raises(ManifestError, match="does not exist"):
        import_csv(str(tmp_path / "nope.csv"))


def test_csv_through_a_uri_keeps_the_scheme(tmp_path):
    folder = tmp_path / "with space"
    flac = next(SAMPLE.glob("Actor_18/*.flac"))
    folder.mkdir()
    shutil.copy(flac, folder / "a b.flac")
    write_rows(folder / "m.csv", ["id", "audio", "split"], [["a", "a b.flac", "development"]])
    uri = (folder / "m.csv").as_uri()
    [row] = import_csv(uri)
    assert row.audio == (folder / "a b.flac").as_uri() and row.audio.startswith("file:///")
    assert read_bytes(row.audio) == flac.read_bytes()


# --- folder and listing -------------------------------------------------------------------------


def test_folder_finds_audio_recursively_with_extension_in_id(tmp_path):
    flacs = sorted(SAMPLE.glob("Actor_22/*.flac"))
    root = tmp_path / "podcasts"
    write_wav(flacs[0], root / "show1" / "ep1.wav")
    shutil.copy(flacs[1], root / "show1" / "ep1.flac")
    write_wav(flacs[2], root / "show2" / "deep" / "EP9.WAV")
    write_wav(flacs[3], root / "top.ogg")
    (root / "show1" / "notes.txt").write_text("not listed as audio\n")
    (root / "show1" / "._ep1.wav").write_bytes(b"macOS metadata")
    manifest = import_folder(str(root), split="unlabeled")
    assert [u.id for u in manifest] == ["show1/ep1.flac", "show1/ep1.wav", "show2/deep/EP9.WAV", "top.ogg"]
    assert all(u.split == "unlabeled" and not u.labelled for u in manifest)
    assert manifest[2].audio == str(root / "show2" / "deep" / "EP9.WAV")
    assert [u.split for u in import_folder(str(root), "train")] == ["train"] * 4


def test_folder_lists_what_is_named_like_audio_but_unreadable_so_prep_rejects_it(tmp_path):
    """A dangling link and a folder named x.wav were skipped without a word; now prep's own reader
    gives each a reason for rejects.parquet."""
    root = tmp_path / "corpus"
    write_wav(sorted(SAMPLE.glob("Actor_01/*.flac"))[0], root / "good.wav")
    (root / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (root / "folder.wav").mkdir()
    manifest = import_folder(str(root))
    assert [u.id for u in manifest] == ["dangling.wav", "folder.wav", "good.wav"]
    prep = load_config(PrepConfig, None, [f"sources=[{{kind: folder, path: {root}}}]", f"output={tmp_path / 'out'}"])
    reasons = {}
    for utterance in manifest[:2]:
        with pytest.raises(AudioRejected) as error:
            load_frames(utterance.audio, prep.features, prep.storage_dtype, prep.min_seconds)
        reasons[utterance.id] = reject_reason(error.value)
    assert reasons == {"dangling.wav": f"unreadable: [Errno 2] No such file or directory: '{root / 'dangling.wav'}'",
                       "folder.wav": f"unreadable: [Errno 21] Is a directory: '{root / 'folder.wav'}'"}


def test_folder_mistakes(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ManifestError, match="empty.*no utterances found"):
        import_folder(str(tmp_path / "empty"))
    with pytest.raises(ManifestError, match="does not exist"):
        import_folder(str(tmp_path / "missing"))
    with pytest.raises(ManifestError, match="expected a folder or a .txt listing"):
        import_folder(str(tmp_path / "empty" / "readme.md"))
    with pytest.raises(ManifestError, match=r"field 'split': 'dev' is not a known split; known splits: train, "):
        import_folder(str(SAMPLE), split="dev")


def test_listing_file(tmp_path):
    flac = next(SAMPLE.glob("Actor_01/*.flac"))
    write_wav(flac, tmp_path / "lists" / "clips" / "one.wav")
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text(
        "# clips for training\n"
        "\n"
        "clips/one.wav\n"
        f"  {flac}  \n"
        "   # indented comment\n"
        "s3://bucket/podcast/ep1.opus\n"
        "../elsewhere/two.flac\n"
    )
    manifest = import_folder(str(listing), split="train")
    by_id = {u.id: u for u in manifest}
    assert list(by_id) == sorted(by_id) and len(by_id) == 4
    assert by_id["clips/one.wav"].audio == str(tmp_path / "lists" / "clips" / "one.wav")
    assert by_id[str(flac)].audio == str(flac)
    assert by_id["s3://bucket/podcast/ep1.opus"].audio == "s3://bucket/podcast/ep1.opus"
    assert by_id["../elsewhere/two.flac"].audio == str(tmp_path / "elsewhere" / "two.flac")
    assert all(u.split == "train" for u in manifest)
    listing.write_text("a.wav\n# comment\nb.wav\na.wav\n")
    with pytest.raises(ManifestError, match=r"train\.txt line 4: duplicate id 'a.wav'; first at .*train\.txt line 1"):
        import_folder(str(listing))


def test_folder_through_a_uri(tmp_path):
    shutil.copytree(SAMPLE / "Actor_17", tmp_path / "my corpus" / "Actor_17")
    manifest = import_folder((tmp_path / "my corpus").as_uri())
    assert len(manifest) == 60
    first = manifest[0]
    assert first.id == f"Actor_17/{sorted(SAMPLE.glob('Actor_17/*.flac'))[0].name}"
    assert first.audio == (tmp_path / "my corpus" / first.id).as_uri()
    assert "my%20corpus" in first.audio
    assert read_bytes(first.audio) == (SAMPLE / first.id).read_bytes()


def test_audio_extensions_follow_libsndfile():
    assert {"wav", "flac", "ogg", "opus", "oga", "aiff"} <= AUDIO_EXTENSIONS
    assert ("mp3" in AUDIO_EXTENSIONS) == ("MP3" in sf.available_formats())
    assert not {"raw", "txt", "csv", "md"} & AUDIO_EXTENSIONS


# --- several sources ----------------------------------------------------------------------------


def test_build_manifest_merges_sources(tmp_path):
    msp = msp_release(tmp_path / "msp")
    extra = tmp_path / "extra"
    write_wav(next(SAMPLE.glob("Actor_02/*.flac")), extra / "clip.wav")
    sources = [SourceSpec("ravdess", str(SAMPLE)), SourceSpec("msp_podcast", str(msp)),
               SourceSpec("folder", str(extra), split="unlabeled")]
    manifest = build_manifest(sources)
    assert len(manifest) == 360 + len(MSP_ROWS) + 1
    assert [u.id for u in manifest] == sorted(u.id for u in manifest)
    assert Counter(u.split for u in manifest)["unlabeled"] == 1
    # The config's SourceConfig works the same way.
    assert build_manifest([SourceConfig(kind="folder", path=str(extra), split="test")]) == [
        Utterance("clip.wav", str(extra / "clip.wav"), "test")
    ]


def test_build_manifest_mistakes(tmp_path):
    csv_path = write_rows(tmp_path / "m.csv", ["id", "audio", "split"], [["03-01-01-01-01-01-01", "x.wav", "train"]])
    with pytest.raises(ManifestError) as error:
        build_manifest([SourceSpec("ravdess", str(SAMPLE)), SourceSpec("csv", str(csv_path))])
    message = str(error.value)
    assert "duplicate id '03-01-01-01-01-01-01'" in message
    assert f"csv source {csv_path}, column 'id' (audio {tmp_path / 'x.wav'})" in message
    assert f"first at ravdess source {SAMPLE}" in message
    with pytest.raises(ValueError, match=r"sources\[1\], field 'kind': 'wav' is not one of msp_podcast, ravdess, csv, folder"):
        build_manifest([SourceSpec("csv", str(csv_path)), SourceSpec("wav", str(tmp_path))])
    with pytest.raises(ManifestError, match=r"field 'split': only kind 'folder' takes a split"):
        build_manifest([SourceSpec("ravdess", str(SAMPLE), split="train")])


def test_importer_kinds_match_the_config():
    assert tuple(IMPORTERS) == SOURCE_KINDS
    assert set(SPLITS) >= {"train", "development", "test", "unlabeled"}
