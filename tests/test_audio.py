from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.audio import AudioRejected, load_audio

RATE = 16000


@pytest.fixture(scope="module")
def real(sample_files: list[Path]) -> tuple[bytes, np.ndarray]:
    """Bytes of one real FLAC and its samples as soundfile decodes them."""
    data = sample_files[0].read_bytes()
    wave, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == RATE and wave.ndim == 1
    return data, wave


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, subtype=subtype, format=fmt)
    return buffer.getvalue()


def rejection(data: bytes, **kwargs) -> AudioRejected:
    with pytest.raises(AudioRejected) as info:
        load_audio(data, "clip.wav", kwargs.pop("sample_rate", RATE), **kwargs)
    assert "clip.wav" in str(info.value)
    return info.value


def test_real_flac_decodes_unchanged(real):
    data, wave = real
    out = load_audio(data, "a.flac", RATE)
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_array_equal(out, wave)


def test_truncated_flac_is_unreadable(real):
    data, _ = real
    assert rejection(data[: len(data) // 2]).reason.startswith("unreadable:")


def test_corrupt_flac_is_unreadable(real):
    data, _ = real
    corrupt = bytearray(data)
    corrupt[5000:9000] = bytes(4000)
    assert rejection(bytes(corrupt)).reason.startswith("unreadable:")


def test_text_file_is_unreadable(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 50)
    reason = rejection(path.read_bytes()).reason
    assert reason.startswith("unreadable:") and "BytesIO" not in reason


def test_empty_file_is_empty():
    assert rejection(wav_bytes(np.zeros(0, dtype=np.float32), RATE)).reason == "empty: no samples"


def test_zeros_are_silent(real):
    _, wave = real
    reason = rejection(wav_bytes(np.zeros_like(wave), RATE)).reason
    assert reason.startswith("silent:") and "peak amplitude 0" in reason


def test_silence_threshold_is_configurable(real):
    _, wave = real
    quiet = wav_bytes(wave * (1e-3 / np.max(np.abs(wave))), RATE, subtype="FLOAT")  # peak 1e-3
    assert load_audio(quiet, "q.wav", RATE).size == wave.size
    assert rejection(quiet, silence_threshold=1e-2).reason.startswith("silent:")


def test_nan_in_float_wav_is_non_finite(real):
    _, wave = real
    broken = wave.copy()
    broken[[10, 20, 30]] = np.nan
    broken[40] = np.inf
    assert rejection(wav_bytes(broken, RATE, subtype="FLOAT")).reason == "non-finite: 4 NaN/Inf samples"


@pytest.mark.parametrize("header_rate", [1000, 500000])
def test_header_rate_out_of_range(real, header_rate):
    _, wave = real
    reason = rejection(wav_bytes(wave, header_rate)).reason
    assert reason == f"bad sample rate: header says {header_rate} Hz"


def test_mislabelled_sample_rate_is_duration_mismatch(real):
    _, wave = real
    true_duration = len(wave) / RATE
    mislabelled = wav_bytes(wave, 8000)  # the 16 kHz samples declared as 8 kHz: twice as long
    reason = rejection(mislabelled, expected_duration=true_duration).reason
    assert reason.startswith("duration mismatch:")
    assert f"decoded {2 * true_duration:.2f} s" in reason and f"says {true_duration:.2f} s" in reason


def test_duration_within_tolerance_passes(real):
    data, wave = real
    duration = len(wave) / RATE
    assert load_audio(data, "a.flac", RATE, expected_duration=duration + 0.09).size == wave.size
    assert rejection(data, expected_duration=duration + 0.3).reason.startswith("duration mismatch:")


def test_stereo_becomes_channel_mean(real):
    _, wave = real
    left, right = wave, 0.5 * wave[::-1].copy()
    out = load_audio(wav_bytes(np.stack([left, right], axis=1), RATE, subtype="FLOAT"), "s.wav", RATE)
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("file_rate", [44100, 8000])
def test_resampled_length(real, file_rate):
    _, wave = real
    n = len(wave)  # the real samples, declared at file_rate: n / file_rate seconds
    out = load_audio(wav_bytes(wave, file_rate, subtype="FLOAT"), "r.wav", RATE)
    assert out.dtype == np.float32
    assert abs(len(out) - n * RATE / file_rate) <= 2


def test_resampling_preserves_a_tone():
    t = np.arange(44100) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = load_audio(wav_bytes(tone, 44100, subtype="FLOAT"), "tone.wav", RATE)
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(out)) / RATE)
    # Away from the edges, where the resampling filter has no signal on one side.
    np.testing.assert_allclose(out[500:-500], expected[500:-500], atol=1e-3)


def test_invalid_arguments(real):
    data, _ = real
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(data, "a.flac", 100)
    with pytest.raises(ValueError, match="expected_duration"):
        load_audio(data, "a.flac", RATE, expected_duration=0.0)
