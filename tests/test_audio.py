"""Audio: wav reading, resampling, log-mel features (checked against scipy and hand-derived
properties), the three datasets on tiny file sets in their real on-disk layout, the feature
cache, every audio model, and the CPU-scale FSDD config end to end on the real files."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal
import torch

from kdaudit import cli
from kdaudit.config import ConfigError, load_config
from kdaudit.data import DATASETS
from kdaudit.data import audio as audio_data
from kdaudit.data.audio import (
    WORDS,
    FSDDConfig,
    SpeechCommandsConfig,
    UrbanSound8KConfig,
    split_test,
)
from kdaudit.data.audio_features import (
    LogMel,
    fix_length,
    log_mel,
    mel_centres,
    mel_filterbank,
    power_spectrogram,
    read_wav,
    resample,
)
from kdaudit.data.files import DatasetMissing, Resource
from kdaudit.models import MODELS, build_model

ROOT = Path(__file__).parents[1]
SHARED = Path(os.environ.get("KDAUDIT_SHARED_DATA") or ROOT.parent / "shared" / "data")
AUDIO_MODELS = [n for n in MODELS.names() if MODELS.get(n).build.__module__.endswith(".audio")]


# ---------------------------------------------------------------- writing wav files


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate)


def write_wav(path: Path, x: np.ndarray, rate: int, width: int = 2) -> None:
    """PCM through the `wave` module: width 1 (unsigned 8-bit), 2, 3 (24-bit) or 4 bytes;
    x is (L,) or (L, channels) in [-1, 1]."""
    x = x if x.ndim == 2 else x[:, None]
    if width == 1:
        raw = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    else:
        ints = np.round(x * (2 ** (8 * width - 1) - 1)).astype("<i4")
        raw = ints.view(np.uint8).reshape(-1, 4)[:, :width].tobytes()  # little-endian low bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def write_float_wav(path: Path, x: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.wavfile.write(path, rate, x.astype(np.float32))


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


# ---------------------------------------------------------------- waveforms


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_pcm_depths(tmp_path, width):
    x = tone(440, 8000, 0.1)
    write_wav(tmp_path / "a.wav", x, 8000, width)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=2.0 / 2 ** (8 * width - 1))


def test_read_wav_float_and_stereo_mixed_to_mono(tmp_path):
    x = tone(300, 22050, 0.05)
    write_float_wav(tmp_path / "f.wav", x, 22050)
    np.testing.assert_allclose(read_wav(tmp_path / "f.wav")[0], x, atol=1e-7)
    write_wav(tmp_path / "s.wav", np.stack([x, 0.5 * x], axis=1), 22050, 2)
    np.testing.assert_allclose(read_wav(tmp_path / "s.wav")[0], 0.75 * x, atol=1e-4)


@pytest.mark.parametrize(("rate", "freq"), [(8000, 440.0), (44100, 1000.0), (11025, 2500.0)])
def test_resampling_to_16k_keeps_a_sines_frequency(rate, freq):
    y = resample(tone(freq, rate, 1.0).astype(np.float32), rate, 16_000)
    assert len(y) == 16_000
    assert peak_hz(y, 16_000) == pytest.approx(freq, abs=1.0)  # 1 s: 1 Hz bins


def test_fix_length_pads_with_zeros_and_cuts_the_end():
    x = np.arange(1, 6, dtype=np.float32)
    np.testing.assert_array_equal(fix_length(x, 7), [1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(fix_length(x, 3), [1, 2, 3])


# ---------------------------------------------------------------- features


def test_mel_filterbank_has_the_textbook_shape():
    n_mels, f_max = 32, 8000.0
    edges = mel_centres(n_mels, 0.0, f_max)
    mel = 2595 * np.log10(1 + edges / 700)  # textbook HTK formula, computed here
    np.testing.assert_allclose(np.diff(mel), mel[-1] / (n_mels + 1), rtol=1e-9)
    assert edges[0] == pytest.approx(0) and edges[-1] == pytest.approx(f_max)
    centres = edges[1:-1]
    # each triangle is 1 at its own centre and 0 at every other centre
    np.testing.assert_allclose(
        mel_filterbank(n_mels, centres, 0.0, f_max), np.eye(n_mels), atol=1e-12
    )
    # halfway (in Hz) between neighbouring centres, both triangles are at 0.5
    mids = (centres[:-1] + centres[1:]) / 2
    fb = mel_filterbank(n_mels, mids, 0.0, f_max).numpy()  # (M, M-1)
    np.testing.assert_allclose(np.diagonal(fb), 0.5, atol=1e-12)
    np.testing.assert_allclose(np.diagonal(fb, -1), 0.5, atol=1e-12)
    # a partition of unity between the first and last centre; zero outside each triangle
    freqs = np.linspace(centres[0], centres[-1], 1001)
    fb = mel_filterbank(n_mels, freqs, 0.0, f_max).numpy()
    np.testing.assert_allclose(fb.sum(axis=0), 1.0, atol=1e-12)
    assert fb.min() >= 0 and ((fb > 0).sum(axis=0) <= 2).all()
    assert mel_filterbank(n_mels, np.array([0.0, f_max]), 0.0, f_max).abs().max() < 1e-12


def test_power_spectrogram_matches_scipy_stft():
    x = np.random.default_rng(0).standard_normal(4000)
    window = scipy.signal.get_window("hann", 512)  # periodic, like torch.hann_window
    # scipy: even (reflect) extension by half a window at both ends = torch's centred frames
    _, _, z = scipy.signal.stft(
        x,
        window=window,
        nperseg=512,
        noverlap=256,
        boundary="even",
        padded=False,
        detrend=False,
        scaling="spectrum",
    )
    expected = np.abs(z * window.sum()) ** 2  # undo scipy's 1/sum(window) scaling
    ours = power_spectrogram(torch.from_numpy(x)[None], 512, 256)[0].numpy()
    assert ours.shape == expected.shape == (257, 4000 // 256 + 1)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)


def test_log_mel_of_a_tone_peaks_in_the_band_nearest_its_frequency():
    settings = LogMel()
    x = torch.from_numpy(tone(1000, 16_000, 1.0)).float()[None]
    features = log_mel(x, settings)  # (1, M, frames)
    assert features.shape == (1, 32, 63)
    centres = mel_centres(32, 0.0, 8000.0)[1:-1]
    assert int(features[0].mean(dim=1).argmax()) == int(np.argmin(np.abs(centres - 1000)))
    silent = log_mel(torch.zeros(1, 16_000), settings)
    assert torch.allclose(silent, torch.tensor(np.log(1e-6), dtype=torch.float32))


# ---------------------------------------------------------------- FSDD


def write_fsdd(data_dir: Path, speakers=("jackson",), indices=range(7)) -> None:
    for digit in range(10):
        for speaker in speakers:
            for i in indices:
                x = tone(200 + 100 * digit, 8000, 0.3 + 0.01 * i)
                write_wav(data_dir / "fsdd" / "recordings" / f"{digit}_{speaker}_{i}.wav", x, 8000)


def build(cfg, data_dir: Path):
    return DATASETS.build(cfg, data_dir)  # not load_data: no per-process cache


def test_fsdd_tiny_file_set_official_split(tmp_path):
    write_fsdd(tmp_path)
    data = build(FSDDConfig(n_files=70), tmp_path)
    assert data.input_shape == (1, 32, 63) and data.num_classes == 10
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.test_y.bincount().tolist() == [5] * 10  # index 0-4
    assert data.train_y.bincount().tolist() == [2] * 10  # index 5-6
    assert abs(float(data.train_x.mean())) < 1e-4 and float(data.train_x.std()) == pytest.approx(
        1, abs=1e-3
    )


def test_fsdd_missing_or_wrong_files_name_the_problem(tmp_path):
    with pytest.raises(DatasetMissing, match="Jakobovski/free-spoken-digit-dataset") as err:
        build(FSDDConfig(), tmp_path)
    assert str(tmp_path / "fsdd" / "recordings") in str(err.value)
    write_fsdd(tmp_path)
    with pytest.raises(
        DatasetMissing, match=r"holds 70 recordings, expected 3000.*0_jackson_10\.wav"
    ):
        build(FSDDConfig(), tmp_path)
    write_wav(tmp_path / "fsdd" / "recordings" / "zero_jackson.wav", tone(200, 8000, 0.1), 8000)
    with pytest.raises(DatasetMissing, match="zero_jackson.wav"):
        build(FSDDConfig(n_files=None), tmp_path)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}  # fmt: skip


def test_feature_cache_is_reused_and_keyed_by_the_settings(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    monkeypatch.setenv("KDAUDIT_CACHE", str(cache))
    write_fsdd(data)
    before = _files(data)
    first = build(FSDDConfig(n_files=70), data)
    assert _files(data) == before  # the data directory is left exactly as it was
    assert len(list((cache / "audio").glob("features-*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(audio_data, "compute_features", fail)
    second = build(FSDDConfig(n_files=70), data)
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    with pytest.raises(AssertionError, match="recomputed"):
        build(FSDDConfig(n_files=70, n_mels=16), data)


def test_an_unwritable_cache_is_a_warning_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("KDAUDIT_CACHE", str(blocker))
    write_fsdd(tmp_path / "data")
    with pytest.warns(UserWarning, match="cannot keep audio in the cache"):
        data = build(FSDDConfig(n_files=70), tmp_path / "data")
    assert data.train_x.shape[0] > 0


@pytest.mark.parametrize("damage", ["not a wav", "truncated header"])
def test_unreadable_wav_is_named(tmp_path, damage):
    write_fsdd(tmp_path)
    path = tmp_path / "fsdd" / "recordings" / "3_jackson_2.wav"
    path.write_bytes(b"not a wav file" if damage == "not a wav" else path.read_bytes()[:30])
    with pytest.raises(DatasetMissing, match="3_jackson_2.wav is not a readable wav file"):
        build(FSDDConfig(n_files=70), tmp_path)


# ---------------------------------------------------------------- Speech Commands


def write_speechcommands(root: Path) -> None:
    """Per word: one training, one validation and one test clip (16 kHz, 16-bit)."""
    validation, testing = [], []
    for k, word in enumerate(WORDS):
        for n, names in enumerate((None, validation, testing)):
            rel = f"{word}/{k:08x}_nohash_{n}.wav"
            write_wav(root / rel, tone(100 + 40 * k, 16_000, 0.5 + 0.2 * n), 16_000)
            if names is not None:
                names.append(rel)
    write_wav(root / "_background_noise_" / "white_noise.wav", tone(50, 16_000, 2.0), 16_000)
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")


def test_speechcommands_tiny_file_set_lists_and_validation_option(tmp_path):
    write_speechcommands(tmp_path / "speechcommands")
    data = build(SpeechCommandsConfig(download=False), tmp_path)
    assert data.input_shape == (1, 32, 63) and data.num_classes == 35
    assert data.train_y.tolist() == list(range(35)) and data.test_y.tolist() == list(range(35))
    merged = build(SpeechCommandsConfig(download=False, validation="train"), tmp_path)
    assert merged.train_y.bincount().tolist() == [2] * 35
    assert torch.equal(merged.test_y, data.test_y)


def test_speechcommands_missing_files_name_the_fix(tmp_path):
    with pytest.raises(
        DatasetMissing, match=r"speech_commands_v0\.02\.tar\.gz.*storage\.googleapis"
    ):
        build(SpeechCommandsConfig(download=False), tmp_path)
    root = tmp_path / "speechcommands"
    write_speechcommands(root)
    (root / "yes" / f"{WORDS.index('yes'):08x}_nohash_2.wav").unlink()
    with pytest.raises(DatasetMissing, match=r"1 files named in the lists are absent \(yes/"):
        build(SpeechCommandsConfig(download=False), tmp_path)
    shutil.rmtree(root / "visual")
    with pytest.raises(DatasetMissing, match="visual"):
        build(SpeechCommandsConfig(download=False), tmp_path)


def make_archive(src: Path, archive: Path, prefix: str) -> tuple[str, str, str]:
    """A tar.gz of `src` under `prefix`, offered at a file:// URL with its checksums."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=prefix)
    digest = lambda name: hashlib.new(name, archive.read_bytes()).hexdigest()  # noqa: E731
    return archive.as_uri(), digest("sha256"), digest("md5")


def test_speechcommands_downloads_verifies_and_unpacks(tmp_path, monkeypatch):
    write_speechcommands(tmp_path / "src")
    url, sha256, _ = make_archive(tmp_path / "src", tmp_path / "sc.tar.gz", ".")
    resource = Resource("speech_commands_v0.02.tar.gz", url=url, sha256=sha256)
    monkeypatch.setattr(audio_data, "SPEECH_COMMANDS", resource)
    data_dir = tmp_path / "data"
    data = build(SpeechCommandsConfig(), data_dir)
    assert (data_dir / "speechcommands" / "testing_list.txt").is_file()
    assert data.n_train == 35 and len(data.test_y) == 35
    assert not list(data_dir.glob(".speechcommands.part*"))


# ---------------------------------------------------------------- UrbanSound8K

CLASSES = (
    "air_conditioner",
    "car_horn",
    "children_playing",
    "dog_bark",
    "drilling",
    "engine_idling",
    "gun_shot",
    "jackhammer",
    "siren",
    "street_music",
)
FORMATS = [
    (44100, 2, 1),
    (48000, 3, 2),
    (22050, 1, 1),
    (8000, 4, 1),
    (96000, 0, 2),
]  # rate, width (0: float), channels


def write_urbansound8k(root: Path) -> None:
    """5 slices per class, one per fold 1..5, in assorted rates, depths and channel counts."""
    rows = []
    for c in range(10):
        for j, (rate, width, channels) in enumerate(FORMATS):
            name = f"{1000 + c}-{c}-0-{j}.wav"
            x = tone(150 * (c + 1), rate, 0.4 + 0.9 * j)
            x = np.stack([x] * channels, axis=1) if channels == 2 else x
            path = root / "audio" / f"fold{j + 1}" / name
            write_float_wav(path, x, rate) if width == 0 else write_wav(path, x, rate, width)
            rows.append([name, 1000 + c, 0.0, 1.0, 1, j + 1, c, CLASSES[c]])
    (root / "metadata").mkdir(parents=True)
    with open(root / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
        )
        out.writerows(rows)


# tiny file sets for a data directory, by dataset name (for config smoke tests)
AUDIO_WRITERS = {
    "speechcommands": lambda data_dir: write_speechcommands(data_dir / "speechcommands"),
    "urbansound8k": lambda data_dir: write_urbansound8k(data_dir / "urbansound8k"),
}


def test_urbansound8k_tiny_file_set_split(tmp_path):
    write_urbansound8k(tmp_path / "urbansound8k")
    data = build(UrbanSound8KConfig(download=False), tmp_path)
    assert data.input_shape == (1, 32, 251) and data.num_classes == 10  # 4 s: 64000 / 256 + 1
    assert data.test_y.bincount().tolist() == [1] * 10  # stratified: round(0.2 * 5) per class
    assert data.train_y.bincount().tolist() == [4] * 10
    again = build(UrbanSound8KConfig(download=False), tmp_path)
    assert torch.equal(again.test_x, data.test_x)  # the split is a function of the seed
    folds = build(UrbanSound8KConfig(download=False, test_folds=(1, 2)), tmp_path)
    assert folds.test_y.bincount().tolist() == [2] * 10


def test_urbansound8k_missing_files_name_the_fix(tmp_path):
    with pytest.raises(DatasetMissing, match=r"UrbanSound8K\.tar\.gz.*zenodo"):
        build(UrbanSound8KConfig(download=False), tmp_path)
    root = tmp_path / "urbansound8k"
    write_urbansound8k(root)
    (root / "audio" / "fold3" / "1004-4-0-2.wav").unlink()
    with pytest.raises(DatasetMissing, match=r"1 of the 50 slices.*fold3/1004-4-0-2\.wav"):
        build(UrbanSound8KConfig(download=False), tmp_path)


def test_urbansound8k_downloads_verifies_md5_and_unpacks(tmp_path, monkeypatch):
    write_urbansound8k(tmp_path / "src")
    url, _, md5 = make_archive(tmp_path / "src", tmp_path / "us.tar.gz", "UrbanSound8K")
    monkeypatch.setattr(
        audio_data, "URBANSOUND8K", Resource("UrbanSound8K.tar.gz", url=url, md5=md5)
    )
    data = build(UrbanSound8KConfig(), tmp_path / "data")
    assert (tmp_path / "data" / "urbansound8k" / "metadata" / "UrbanSound8K.csv").is_file()
    assert data.n_train == 40


def test_split_test_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [10, 20, 31, 7])
    test = split_test(labels, 0.2, 42, stratify=True)
    assert np.bincount(labels[test]).tolist() == [2, 4, 6, 1]
    assert np.array_equal(test, split_test(labels, 0.2, 42, stratify=True))
    assert not np.array_equal(test, split_test(labels, 0.2, 43, stratify=True))
    assert split_test(labels, 0.2, 42, stratify=False).sum() == 14  # round(0.2 * 68)


def test_audio_configs_reject_bad_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: speechcommands, validation: keep}\nmodel: {name: audio_cnn}\n")
    with pytest.raises(ConfigError, match="validation"):
        load_config(path)
    path.write_text("data: {name: urbansound8k, test_size: 1.5}\nmodel: {name: vggish}\n")
    with pytest.raises(ConfigError, match="test_size"):
        load_config(path)


# ---------------------------------------------------------------- models

SMALL = {
    "vggish": {"channels": (8, 16, 16), "convs": (1, 2, 1)},
    "audio_cnn": {"width": 8},
    "ast": {"dim": 32, "depth": 2, "heads": 2, "patch_size": 8, "patch_stride": 6},
}


@pytest.mark.parametrize("name", AUDIO_MODELS)
@pytest.mark.parametrize("shape", [(1, 32, 63), (1, 32, 251)])
def test_audio_model_forward_backward(name, shape):
    entry = MODELS.get(name)
    model = build_model(entry.config(**SMALL.get(name, {})), shape, 10, init_seed=0)
    x, y = torch.randn(3, *shape), torch.tensor([0, 3, 9])
    logits = model(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", AUDIO_MODELS)
def test_audio_model_defaults_build(name):
    model = build_model(MODELS.get(name).config(), (1, 32, 63), 35, init_seed=0)
    assert model.eval()(torch.randn(2, 1, 32, 63)).shape == (2, 35)


def test_ast_layers_start_different_and_small_inputs_are_refused():
    model = build_model(MODELS.get("ast").config(dim=32, depth=2, heads=2), (1, 32, 63), 10, 0)
    a, b = (layer.linear1.weight for layer in model.encoder.layers)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="patch_size"):
        build_model(MODELS.get("ast").config(patch_size=16), (1, 8, 63), 10, 0)


# ---------------------------------------------------------------- configs end to end


@pytest.mark.parametrize(
    ("config", "writer", "folder"),
    [
        ("configs/paper/speechcommands_vggish.yaml", write_speechcommands, "speechcommands"),
        ("configs/paper/urbansound8k_vggish.yaml", write_urbansound8k, "urbansound8k"),
    ],
)
def test_paper_audio_configs_smoke_on_tiny_file_sets(tmp_path, config, writer, folder):
    writer(tmp_path / "data" / folder)
    # narrow channels: the paper's VGGish costs ~1 GMAC per 4 s clip, minutes on 2 busy cores
    sets = ("train.max_steps=1", "protocol.alphas=[0.5]", "model.channels=[8, 8, 8, 8]")
    assert cli.main(_smoke(ROOT / config, tmp_path / "out", tmp_path / "data", *sets)) == 0


def _smoke(config: Path, out: Path, data_dir: Path, *sets: str) -> list[str]:
    """`kdaudit run CONFIG --smoke` on the CPU, with `--set` overrides."""
    argv = ["run", str(config), "--smoke", "--out", str(out), "--device", "cpu",
            "--data-dir", str(data_dir)]  # fmt: skip
    return argv + [arg for item in sets for arg in ("--set", item)]


@pytest.fixture(scope="module")
def real_fsdd(tmp_path_factory) -> Path:
    """A data directory whose fsdd/recordings links to the shared real files, so that the
    feature cache is written here and not into the shared folder."""
    recordings = SHARED / "fsdd" / "recordings"
    if not recordings.is_dir():
        pytest.skip(f"the real FSDD files are not at {recordings} (set $KDAUDIT_SHARED_DATA)")
    data_dir = tmp_path_factory.mktemp("fsdd-data")
    (data_dir / "fsdd").mkdir()
    (data_dir / "fsdd" / "recordings").symlink_to(recordings)
    return data_dir


def test_fsdd_real_files(real_fsdd):
    data = build(FSDDConfig(), real_fsdd)
    assert data.n_train == 2700 and len(data.test_y) == 300
    assert data.train_y.bincount().tolist() == [270] * 10
    assert data.test_y.bincount().tolist() == [30] * 10
    assert data.input_shape == (1, 32, 63)


@pytest.mark.slow
def test_fsdd_config_runs_end_to_end_on_real_files(real_fsdd, tmp_path):
    argv = _smoke(ROOT / "configs" / "fsdd.yaml", tmp_path / "out", real_fsdd, "train.max_steps=5")
    assert cli.main(argv) == 0
