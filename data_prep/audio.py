"""Decode one audio file from bytes and check that it is usable speech input.

`load_audio` returns mono float32 samples at the requested rate or raises `AudioRejected`, whose
`.reason` starts with a stable keyword (`unreadable`, `bad sample rate`, `empty`, `non-finite`,
`silent`, `duration mismatch`) so that rejections can be counted by kind.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 384000
DURATION_TOLERANCE_S = 0.1
DURATION_TOLERANCE_FRACTION = 0.05


class AudioRejected(Exception):
    """Raised with .reason (short human-readable string) when a file cannot be used."""

    def __init__(self, reason: str, source: str | None = None):
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason = reason
        self.source = source


def load_audio(
    data: bytes,
    source: str,
    sample_rate: int,
    expected_duration: float | None = None,
    silence_threshold: float = 1e-4,
) -> np.ndarray:
    """Decode bytes of any format libsndfile reads -> mono float32 at sample_rate (resample with soxr, 'HQ').

    `source` only names the file in messages. `expected_duration` (seconds, from a manifest) catches
    files whose header sample rate is wrong.
    """
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"sample_rate {sample_rate} is outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]")
    if expected_duration is not None and not (np.isfinite(expected_duration) and expected_duration > 0):
        raise ValueError(f"expected_duration must be a positive number of seconds, got {expected_duration}")

    try:
        samples, file_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError) as error:
        # LibsndfileError's str() embeds the BytesIO repr; its error_string is the useful part.
        detail = getattr(error, "error_string", None) or str(error)
        raise AudioRejected(f"unreadable: {detail}", source) from error

    if not MIN_SAMPLE_RATE <= file_rate <= MAX_SAMPLE_RATE:
        raise AudioRejected(f"bad sample rate: header says {file_rate} Hz", source)
    if samples.size == 0:
        raise AudioRejected("empty: no samples", source)
    bad = int(samples.size - np.count_nonzero(np.isfinite(samples)))
    if bad:
        raise AudioRejected(f"non-finite: {bad} NaN/Inf samples", source)

    wave = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    peak = float(np.max(np.abs(wave)))
    if peak < silence_threshold:
        raise AudioRejected(f"silent: peak amplitude {peak:.3g} below {silence_threshold:g}", source)

    if expected_duration is not None:
        decoded = len(wave) / file_rate
        tolerance = max(DURATION_TOLERANCE_S, DURATION_TOLERANCE_FRACTION * expected_duration)
        if abs(decoded - expected_duration) > tolerance:
            raise AudioRejected(
                f"duration mismatch: decoded {decoded:.2f} s but the manifest says "
                f"{expected_duration:.2f} s (mislabelled sample rate?)",
                source,
            )

    if file_rate != sample_rate:
        wave = soxr.resample(wave, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)
