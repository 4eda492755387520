from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf

from data_prep.mel import MelSpectrogram

SR, N_FFT, HOP, N_MELS = 16000, 512, 256, 128


@pytest.fixture(scope="module")
def waves(sample_files: list[Path]) -> list[np.ndarray]:
    """A few real waves from different actors."""
    picks = sample_files[:: max(1, len(sample_files) // 4)][:4]
    return [sf.read(path, dtype="float32")[0] for path in picks]


def librosa_mel(wave: np.ndarray) -> np.ndarray:
    peak_normalised = wave / np.max(np.abs(wave))
    mel = librosa.feature.melspectrogram(
        y=peak_normalised, sr=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, power=2.0
    )
    return mel.T


@pytest.mark.slow
def test_power_matches_librosa(waves):
    extract = MelSpectrogram()
    for wave in waves:
        ours, reference = extract(wave), librosa_mel(wave)
        assert ours.dtype == np.float32
        assert ours.shape == reference.shape == (1 + len(wave) // HOP, N_MELS)
        peak = np.max(reference)
        assert np.max(np.abs(ours - reference)) / peak <= 1e-4
        significant = reference >= 1e-6 * peak
        relative = np.abs(ours - reference)[significant] / reference[significant]
        assert np.max(relative) <= 1e-4


def test_log_matches_librosa(waves):
    floor = 1e-10
    extract = MelSpectrogram(scale="log", log_floor=floor)
    for wave in waves:
        ours, reference = extract(wave), librosa_mel(wave)
        assert np.all(ours >= np.float32(np.log(floor)))
        np.testing.assert_array_equal(ours[reference == 0], np.float32(np.log(floor)))
        significant = reference >= 1e-6 * np.max(reference)
        np.testing.assert_allclose(ours[significant], np.log(reference[significant]), rtol=0, atol=1e-4)
        # Far below the peak, float32 FFT round-off (torch/MKL) reaches a few 1e-4 relative.
        above = reference > floor
        np.testing.assert_allclose(ours[above], np.log(reference[above]), rtol=0, atol=1e-3)


def test_peak_normalisation_removes_gain(waves):
    extract = MelSpectrogram()
    wave = waves[0]
    normalised = extract(wave)
    assert np.max(np.abs(extract(0.1 * wave) - normalised)) <= 1e-5 * np.max(normalised)
    raw = MelSpectrogram(peak_normalize=False)
    quiet = raw(0.5 * wave)
    assert np.max(quiet) < 0.5 * np.max(normalised)  # the sample's peak is well below 1
    np.testing.assert_allclose(raw(2 * wave), 16 * quiet, rtol=1e-4, atol=1e-6 * np.max(quiet))


@pytest.mark.filterwarnings("ignore:n_fft=512 is too large:UserWarning")
@pytest.mark.parametrize("n_samples", [1, 100, 300, 511])
def test_short_input(waves, n_samples):
    extract = MelSpectrogram()
    start = int(np.argmax(np.abs(waves[0])))
    wave = waves[0][start : start + n_samples]
    ours = extract(wave)
    assert ours.shape == (1 + n_samples // HOP, N_MELS) == (extract.num_frames(n_samples), N_MELS)
    reference = librosa_mel(wave)
    assert np.max(np.abs(ours - reference)) <= 1e-4 * np.max(reference)


def test_other_settings_match_librosa(waves):
    extract = MelSpectrogram(sample_rate=8000, n_fft=256, hop_length=80, n_mels=40)
    wave = waves[1]
    reference = librosa.feature.melspectrogram(
        y=wave / np.max(np.abs(wave)), sr=8000, n_fft=256, hop_length=80, n_mels=40
    ).T
    ours = extract(wave)
    assert ours.shape == reference.shape
    assert np.max(np.abs(ours - reference)) <= 1e-4 * np.max(reference)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"sample_rate": 0}, "sample_rate"),
        ({"n_fft": 256.0}, "n_fft"),
        ({"hop_length": -1}, "hop_length"),
        ({"hop_length": 1024}, "hop_length"),
        ({"n_mels": 0}, "n_mels"),
        ({"scale": "db"}, "scale"),
        ({"log_floor": 0.0}, "log_floor"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MelSpectrogram(**kwargs)


def test_rejects_bad_wave():
    extract = MelSpectrogram()
    with pytest.raises(ValueError, match="1-D"):
        extract(np.zeros((2, 1000), dtype=np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        extract(np.zeros(0, dtype=np.float32))
