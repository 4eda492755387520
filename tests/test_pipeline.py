"""The prep job end to end on real audio and a real local Ray: output, rejects, stats, resume."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import local_ray

from data_prep.chunking import chunk_starts
from data_prep.config import ChunkConfig, ConfigError, PrepConfig, load_config
from data_prep.dataset import DatasetError, PreparedDataset
from data_prep.importers import import_ravdess
from data_prep.manifest import ManifestError
from data_prep.mel import MelSpectrogram
from data_prep.pipeline import run_prep

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ravdess_sample"


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray():
        yield


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = ["id", "audio", "split", "arousal", "dominance", "valence", "duration"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def good_rows(count: int) -> list[dict]:
    """Real sample files with their RAVDESS labels and splits, through the generic CSV importer."""
    rows = []
    for u in import_ravdess(str(SAMPLE))[:: max(1, 360 // count)][:count]:
        rows.append({"id": u.id, "audio": u.audio, "split": u.split, "arousal": u.arousal,
                     "dominance": u.dominance, "valence": u.valence})
    return rows


def bad_rows(folder: Path) -> dict[str, dict]:
    """One file for each kind of bad input, keyed by the reason keyword expected for it."""
    folder.mkdir()
    real = next(SAMPLE.glob("Actor_01/*.flac"))
    wave, rate = sf.read(real, dtype="float32")
    (folder / "truncated.flac").write_bytes(real.read_bytes()[:300])
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), rate)
    sf.write(folder / "silent.wav", np.zeros(rate * 2, np.float32), rate)
    nan = wave.copy()
    nan[100:110] = np.nan
    sf.write(folder / "nan.wav", nan, rate, subtype="FLOAT")
    middle = len(wave) // 2
    sf.write(folder / "short.wav", wave[middle : middle + int(0.1 * rate)], rate)
    (folder / "notes.wav").write_text("these are not audio samples\n" * 50)
    sf.write(folder / "mislabelled.wav", wave, 8000)  # header says 8 kHz; the manifest knows better
    paths = {
        "unreadable": ("truncated.flac", None), "empty": ("empty.wav", None), "silent": ("silent.wav", None),
        "non-finite": ("nan.wav", None), "too short": ("short.wav", None), "not audio": ("notes.wav", None),
        "duration mismatch": ("mislabelled.wav", len(wave) / rate),
    }
    return {reason: {"id": f"bad-{name}", "audio": str(folder / name), "split": "train", "duration": duration or ""}
            for reason, (name, duration) in paths.items()}


def prep_config(tmp_path: Path, manifest: Path, *overrides: str) -> PrepConfig:
    base = [f"sources=[{{kind: csv, path: {manifest}}}]", f"output={tmp_path / 'out'}", "progress=false"]
    return load_config(PrepConfig, None, [*base, *overrides])


def digest_folder(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_prep_writes_frames_once_rejects_and_stats(tmp_path, ray_cluster):
    good = good_rows(12)
    bad = bad_rows(tmp_path / "bad")
    manifest = write_csv(tmp_path / "manifest.csv", good + list(bad.values()))
    config = prep_config(tmp_path, manifest, "shard_size=5", "storage_dtype=float32")
    summary = run_prep(config)

    dataset = PreparedDataset(config.output)
    table = dataset.read_table()
    assert sorted(table["id"].to_pylist()) == sorted(r["id"] for r in good)
    assert summary.rejected == len(bad)

    rejects = pq.read_table(Path(config.output) / "rejects.parquet").to_pylist()
    by_id = {r["id"]: r["reason"] for r in rejects}
    for keyword, row in bad.items():
        expected = "unreadable" if keyword == "not audio" else keyword
        assert by_id[row["id"]].startswith(expected), (keyword, by_id[row["id"]])
        assert row["audio"] in [r["audio"] for r in rejects]

    # The schema a reader can trust: each utterance's frames once, chunks cut per Eq. 2 on reading.
    frames, lengths = dataset.frame_format.frames_of(table["frames"])
    assert frames.dtype == np.float32 and frames.shape == (int(lengths.sum()), 128)
    assert lengths.tolist() == table["n_frames"].to_pylist()
    mel = MelSpectrogram()
    first = table.slice(0, 1).to_pylist()[0]
    source = next(r for r in good if r["id"] == first["id"])
    wave, _ = sf.read(source["audio"], dtype="float32")
    expected_mel = mel(wave)
    assert first["n_frames"] == len(expected_mel)
    np.testing.assert_allclose(frames[: lengths[0]], expected_mel, rtol=1e-5, atol=1e-6)
    chunks = dataset.frame_format.chunks_of(table["frames"], ChunkConfig(num_chunks=11, chunk_frames=62))
    assert chunks.shape == (12, 11, 62, 128) and chunks.dtype == np.float32
    starts = chunk_starts(len(expected_mel), 11, 62)
    np.testing.assert_allclose(chunks[0][-1], expected_mel[starts[-1] : starts[-1] + 62], rtol=1e-5, atol=1e-6)
    assert first["arousal"] == pytest.approx(source["arousal"])

    # Normalisation statistics: over every frame of the train split only, merged across shards.
    train_frames = [mel(sf.read(r["audio"], dtype="float32")[0]) for r in good if r["split"] == "train"]
    frames = np.concatenate(train_frames).astype(np.float64)
    info = dataset.info
    assert info["stats"]["count"] == len(frames)
    np.testing.assert_allclose(info["stats"]["mean"], frames.mean(0), rtol=1e-6)
    np.testing.assert_allclose(info["stats"]["std"], frames.std(0), rtol=1e-6)
    assert info["counts"]["utterances"] == {s: sum(r["split"] == s for r in good) for s in {r["split"] for r in good}}
    assert info["counts"]["rejected"] == len(bad)
    assert sum(info["counts"]["frames"].values()) == int(lengths.sum()) == sum(s["frames"] for s in info["shards"])
    normalized = dataset.normalizer()(chunks[0])
    assert normalized.min() >= -3 and normalized.max() <= 3


def test_a_dataset_of_the_old_chunk_layout_is_refused_with_what_to_run(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "deepemocluster-mel-chunks/1", "settings": {}}))
    with pytest.raises(DatasetError, match=r"older layout .*python jobs/prep.py --config"):
        PreparedDataset(str(tmp_path))


def test_second_run_changes_nothing(tmp_path, ray_cluster):
    manifest = write_csv(tmp_path / "manifest.csv", good_rows(6))
    config = prep_config(tmp_path, manifest, "shard_size=4")
    first = run_prep(config)
    before = digest_folder(Path(config.output))
    second = run_prep(config)
    assert second.shards_written == 0 and first.shards_written == 2
    assert digest_folder(Path(config.output)) == before


def test_changed_settings_refuse_existing_output(tmp_path, ray_cluster):
    manifest = write_csv(tmp_path / "manifest.csv", good_rows(2))
    run_prep(prep_config(tmp_path, manifest))
    with pytest.raises(ConfigError, match="features"):
        run_prep(prep_config(tmp_path, manifest, "features.scale=log"))
    summary = run_prep(prep_config(tmp_path, manifest, "features.scale=log", "overwrite=true"))
    assert summary.shards_written == 1
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 1  # the stale shard is gone


def test_manifest_error_stops_before_any_work(tmp_path):
    rows = good_rows(3)
    rows[1]["arousal"] = 9.5
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    with pytest.raises(ManifestError, match="arousal"):
        run_prep(prep_config(tmp_path, manifest))
    assert not (tmp_path / "out").exists()
    # The command line: exit status 2, the row and column named, and no Ray started.
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", f"sources=[{{kind: csv, path: {manifest}}}]", f"output={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "manifest.csv line 3" in result.stderr and "'arousal'" in result.stderr, result.stderr
    assert "Ray" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_or_duplicating(tmp_path, ray_cluster):
    rows = good_rows(24)
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_prep", f"sources=[{{kind: csv, path: {manifest}}}]",
               f"output={out}", "shard_size=1", "progress=false"]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("part-*.json")):
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.json")}
    assert 0 < len(done) < len(rows), "the kill came too late or too early to test resuming"
    assert not (out / "dataset.json").exists()

    summary = run_prep(prep_config(tmp_path, manifest, "shard_size=1"))
    assert summary.shards_written == len(rows) - len(done)
    assert {name: (out / name).stat().st_mtime_ns for name in done} == done  # finished shards kept
    ids = PreparedDataset(str(out)).read_table(columns=["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every utterance exactly once
    assert not list(out.glob(".tmp-*"))


PROGRESS_LINE = re.compile(r"prep (\d+)/(\d+) utterances \((\d+\.\d)%\)  [\d.,]+ utt/s  "
                           r"(~\d+(?:\.\d)? (?:s|min|h) left|done in .+)")


def progress_lines(text: str) -> list[re.Match]:
    lines = [line for line in text.splitlines() if line.startswith("prep ") and "utterances (" in line]
    matches = [PROGRESS_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    return matches


def test_prep_without_a_terminal_prints_progress_lines(tmp_path, ray_cluster, capsys):
    """Where the output is not a terminal (pytest's capture here, `ray job logs` on a cluster) tqdm's
    bar is off: plain lines with done / total and the time left take its place."""
    def prep(name: str, count: int, *overrides: str) -> None:
        manifest = write_csv(tmp_path / f"{name}.csv", good_rows(count))
        run_prep(load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {manifest}}}]",
                                                f"output={tmp_path / name}", "shard_size=4", *overrides]))

    prep("every", 12, "progress_seconds=0")  # a line for each of the 3 shards
    out = capsys.readouterr().out
    lines = progress_lines(out)
    assert [int(m[1]) for m in lines] == [4, 8, 12] and {int(m[2]) for m in lines} == {12}, out
    assert [m[3] for m in lines] == ["33.3", "66.7", "100.0"], out
    assert all(m[4].endswith(" left") for m in lines[:-1]) and lines[-1][4].startswith("done in "), out

    prep("default", 4)  # done well within the default 30 s: only the last line
    assert [m[0].split("  ")[0] for m in progress_lines(capsys.readouterr().out)] == ["prep 4/4 utterances (100.0%)"]

    prep("off", 4, "progress=false")  # progress turned off by the user: nothing
    assert not progress_lines(capsys.readouterr().out)


def test_cli_reports_config_mistake_by_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", "--config", str(REPO / "configs/prep/ravdess_sample.yaml"),
         "features.n_mel=64"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "features.n_mel" in result.stderr
