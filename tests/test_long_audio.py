"""Long audio in prep, with `data_prep.frames.MAX_ARRAY_BYTES` lowered so that the sample's real
files cross it: a shard whose frames exceed one Arrow binary array is written in pieces and reads
back row for row; an utterance longer than one stored value may hold is rejected with its reason
(rejects.parquet, dataset.json) and the rest of its shard is written.

The shard is written in this process by the real shard writer (a Ray worker would not see the lowered
limit); `run_prep` then finds it done and finalizes the dataset as after any prep."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import SAMPLE_DIR

from data_prep import frames as frame_layout
from data_prep.config import ChunkConfig, PrepConfig, load_config, output_settings
from data_prep.dataset import PreparedDataset
from data_prep.importers import build_manifest, import_ravdess
from data_prep.pipeline import run_prep
from data_prep.shards import load_frames, plan_shards, write_shard
from data_prep.storage import OutputFolder

LIMIT = 200_000  # bytes: a sample utterance (2-5 s, at most ~80 KB of float16 frames) fits, 40 s does not


def test_a_shard_over_one_arrow_array_is_written_in_pieces_and_a_too_long_utterance_is_rejected(tmp_path,
                                                                                                monkeypatch):
    rows = import_ravdess(str(SAMPLE_DIR))[::30][:12]
    long_wave = np.concatenate([sf.read(row.audio, dtype="float32")[0] for row in rows])  # real speech, ~45 s
    sf.write(tmp_path / "podcast.wav", long_wave, 16000)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,audio,split\n" + "".join(f"{r.id},{r.audio},{r.split}\n" for r in rows)
                        + f"podcast-0001,{tmp_path / 'podcast.wav'},train\n")
    config = load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {manifest}}}]", f"output={tmp_path / 'out'}",
                                            "shard_size=13", "progress=false"])
    [plan] = plan_shards(build_manifest(config.sources), output_settings(config), config.shard_size)
    monkeypatch.setattr(frame_layout, "MAX_ARRAY_BYTES", LIMIT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    expected = {row.id: load_frames(row.audio, config.features, config.storage_dtype, config.min_seconds).stored
                for row in rows}
    layout = frame_layout.FrameFormat(config.storage_dtype, config.features.n_mels)
    assert max(m.nbytes for m in expected.values()) <= LIMIT < sum(m.nbytes for m in expected.values()) / 3
    column = layout.column(list(expected.values()))  # what the shard writer stores
    assert column.num_chunks >= 3 and all(chunk.buffers()[2].size <= LIMIT for chunk in column.chunks)
    values, lengths = layout.frames_of(column)
    np.testing.assert_array_equal(values, np.concatenate(list(expected.values())))
    assert lengths.tolist() == [len(mel) for mel in expected.values()]

    OutputFolder(config.output).make()
    shard = write_shard(plan, config)
    summary = run_prep(config)  # the shard is done: finalizes without Ray

    [reject] = shard["rejects"]
    assert reject["id"] == "podcast-0001" and reject["reason"].startswith("too long: "), reject
    assert f"{layout.max_frames:,}" in reject["reason"] and "shorter segments" in reject["reason"], reject
    assert summary.rejected == 1 and summary.rejected_by_kind == {"too long": 1}
    assert pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist() == [
        {"id": "podcast-0001", "audio": str(tmp_path / "podcast.wav"), "split": "train", "reason": reject["reason"]}]

    dataset = PreparedDataset(config.output)
    table = dataset.read_table()
    assert sorted(table["id"].to_pylist()) == sorted(expected)
    assert table["n_frames"].to_pylist() == [len(expected[i]) for i in table["id"].to_pylist()]
    values, lengths = dataset.frame_format.frames_of(table["frames"])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for index, row_id in enumerate(table["id"].to_pylist()):
        np.testing.assert_array_equal(values[starts[index] : starts[index + 1]], expected[row_id])
    chunks = dataset.frame_format.chunks_of(column, ChunkConfig(num_chunks=3, chunk_frames=62))
    assert chunks.shape == (12, 3, 62, 128)

    with pytest.raises(ValueError, match=r"frames of row 1: .* above the 200,000 bytes"):
        layout.column([expected[rows[0].id], np.zeros((LIMIT // layout.frame_bytes + 1, 128), np.float16)])
