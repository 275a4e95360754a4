"""Audio front end: read wav files, resample, and compute log-mel spectrograms (PROTOCOL 9).

Pure functions with no knowledge of datasets. The spectrogram follows the paper's settings:
mono, 16 kHz, n_fft 512, Hann window, power 2, 32 mel bands (HTK mel scale, no filter
normalisation), then the natural log of (mel power + 1e-6).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LOG_OFFSET = 1e-6  # added to the mel power before the log: silence maps to log(1e-6) = -13.8


@dataclass(frozen=True)
class LogMel:
    """Everything that determines a clip's features (the feature cache is keyed by it)."""

    sample_rate: int = 16_000  # Hz, after resampling
    seconds: float = 1.0  # clips are zero-padded or cut to this duration
    n_fft: int = 512  # window length too (32 ms at 16 kHz)
    hop_length: int = 256  # 16 ms; torchaudio's default (n_fft // 2)
    n_mels: int = 32

    @property
    def n_samples(self) -> int:
        return round(self.seconds * self.sample_rate)

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length + 1  # centred frames


# ---------------------------------------------------------------- waveforms


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A wav file as mono float32 samples in [-1, 1] and its sample rate. Reads 8-bit
    (unsigned), 16/24/32-bit PCM and 32/64-bit float; channels are averaged."""
    from scipy.io import wavfile  # loaded with the audio, not with every dataset

    with warnings.catch_warnings():  # e.g. "Chunk (non-data) not understood, skipping it"
        warnings.simplefilter("ignore", wavfile.WavFileWarning)
        rate, data = wavfile.read(path)
    x = _to_float(data)
    return (x.mean(axis=1) if x.ndim == 2 else x).astype(np.float32), int(rate)


def _to_float(data: np.ndarray) -> np.ndarray:
    if data.dtype.kind == "f":
        return data.astype(np.float64)
    if data.dtype.kind == "u":  # 8-bit PCM is unsigned, centred on 128
        return (data.astype(np.float64) - 128.0) / 128.0
    # scipy returns 24-bit PCM left-justified in int32, so the dtype's full scale fits all
    return data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling by the exact rational factor target / rate."""
    from scipy.signal import resample_poly

    if rate == target:
        return x
    g = math.gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def fix_length(x: np.ndarray, n: int) -> np.ndarray:
    """The first `n` samples, zero-padded at the end when the clip is shorter."""
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(x))] = x[:n]
    return out


def load_clip(path: str | Path, settings: LogMel) -> np.ndarray:
    """One file as the fixed-length mono waveform (n_samples,) that features are made from."""
    x, rate = read_wav(path)
    return fix_length(resample(x, rate, settings.sample_rate), settings.n_samples)


# ---------------------------------------------------------------- spectrograms


def hz_to_mel(f):
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_centres(n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """n_mels + 2 band edges in Hz, equally spaced on the mel scale; band m spans edges
    m .. m+2 and peaks at edge m+1."""
    return mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))


def mel_filterbank(n_mels: int, freqs: np.ndarray, f_min: float, f_max: float) -> torch.Tensor:
    """Triangular filters (n_mels, F) evaluated at frequencies `freqs` (F,) in Hz: linear in Hz
    between neighbouring edges, 1 at each band's centre, unnormalised (peak height 1)."""
    edges = mel_centres(n_mels, f_min, f_max)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1)
    f = np.asarray(freqs, dtype=np.float64)[None, :]  # (1, F)
    rising, falling = (f - lo) / (mid - lo), (hi - f) / (hi - mid)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None))


def power_spectrogram(x: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """|STFT|^2 (B, n_fft // 2 + 1, frames) of waveforms (B, L): periodic Hann window of
    length n_fft, frames centred on multiples of hop_length (reflect padding)."""
    window = torch.hann_window(n_fft, periodic=True, dtype=x.dtype, device=x.device)
    spec = torch.stft(
        x, n_fft, hop_length, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    return spec.real.square() + spec.imag.square()


def log_mel(x: torch.Tensor, settings: LogMel) -> torch.Tensor:
    """Log-mel features (B, n_mels, frames) of waveforms (B, n_samples) at settings.sample_rate."""
    n_freqs = settings.n_fft // 2 + 1
    freqs = np.linspace(0.0, settings.sample_rate / 2, n_freqs)
    fb = mel_filterbank(settings.n_mels, freqs, 0.0, settings.sample_rate / 2).to(x)  # (M, F)
    power = power_spectrogram(x, settings.n_fft, settings.hop_length)  # (B, F, frames)
    return torch.log(fb @ power + LOG_OFFSET)
