"""Every shipped config loads strictly and runs with --smoke: on the real data when it is
in the shared data folder, otherwise on tiny files written in the dataset's real format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdaudit.cli import main
from kdaudit.config import load_config
from kdaudit.data.files import DatasetMissing
from tests.test_audio import AUDIO_WRITERS
from tests.test_text import TEXT, write_text
from tests.test_vision import FAKE_WRITERS

pytestmark = pytest.mark.slow  # end to end: whole grids through the CLI or API

ROOT = Path(__file__).parents[1]
SHARED = Path(os.environ.get("KDAUDIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))
WRITERS = {
    **FAKE_WRITERS,
    **AUDIO_WRITERS,
    # long enough that the 10% test split holds a paper-size window of 257 characters
    "tinyshakespeare": lambda data_dir: write_text(data_dir, TEXT * 10),
}
# Paper-size models shrunk for a two-step CPU smoke run (the config's own structure is kept).
# (Evaluating the 111k TinyShakespeare test positions with the full NanoGPT takes minutes
# per run on a CPU.)
SHRINK = {
    "vggish": ["model.channels=[8, 8, 8, 8]"],
    "nanogpt": ["model.n_layer=1", "model.n_embd=48"],
}
CONFIG_SHRINK = {  # configs whose structure needs more than SHRINK keeps
    "tinyshakespeare_nanogpt_fmkd": ["model.n_layer=6"],  # its feature modules: blocks 4 and 5
}
STUDENT_SHRINK = {  # smaller-student configs: the student model likewise
    "picogpt": ["protocol.student_model.n_layer=1", "protocol.student_model.n_embd=24"],
}


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_loads(path):
    cfg = load_config(ROOT / path)
    assert cfg.name


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_runs_with_smoke(path, tmp_path, capsys, monkeypatch):
    cfg = load_config(ROOT / path)
    data_dir = _linked_shared(tmp_path / "data")
    if cfg.data.name != "mnist1d" and not _present(cfg.data, data_dir):
        if cfg.data.name not in WRITERS:
            pytest.skip(f"no {cfg.data.name} files in {SHARED} and no test writer for them")
        WRITERS[cfg.data.name](data_dir)
        monkeypatch.setattr("kdaudit.data.files.checksum_ok", lambda path, resource: True)
    # the smoke grid narrowed further: one student seed and one alpha (4 runs), 2 steps each
    overrides = ["train.max_steps=2", "train.eval_batch_size=256", "train.eval_train_limit=512",
                 f"protocol.student_seeds=[{cfg.protocol.student_seeds[0]}]",
                 f"protocol.alphas=[{cfg.protocol.alphas[0]}]"]  # fmt: skip
    overrides += SHRINK.get(cfg.model.name, [])
    overrides += CONFIG_SHRINK.get(path.stem, [])
    overrides += STUDENT_SHRINK.get(getattr(cfg.protocol.student_model, "name", None), [])
    args = ["run", str(ROOT / path), "--smoke", "--out", str(tmp_path / "out"), "--device", "cpu",
            "--data-dir", str(data_dir)] + [a for o in overrides for a in ("--set", o)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err


def _linked_shared(data_dir: Path) -> Path:
    """A data directory whose dataset folders are real but whose files link to SHARED, so
    that caches (decoded images, audio features) are written here, never into SHARED."""
    data_dir.mkdir(parents=True)
    if SHARED.is_dir():
        for folder in SHARED.iterdir():
            if folder.is_dir():
                (data_dir / folder.name).mkdir()
                for item in folder.iterdir():
                    (data_dir / folder.name / item.name).symlink_to(item)
    return data_dir


def _present(data_cfg, data_dir: Path) -> bool:
    from dataclasses import replace

    from kdaudit.data import load_data

    no_download = replace(data_cfg, download=False) if hasattr(data_cfg, "download") else data_cfg
    try:
        load_data(no_download, data_dir)
    except DatasetMissing:
        return False
    return True
