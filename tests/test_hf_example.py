"""examples/hf_trainer_distillation.py keeps kdaudit's pairing inside a Hugging Face Trainer:
the batches it feeds are the run's sampler order, and at alpha = 0 (the KD and RCD losses
reduce to CE) KD and RCD train the SIDDO model bit for bit, dropout included."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import kdaudit

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_distillation.py"
V = 20


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("hf_trainer_distillation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_trainer_example_pairs_its_runs_bit_for_bit(example, tmp_path, monkeypatch):
    monkeypatch.setitem(example.TRAINING, "max_steps", 5)
    monkeypatch.setitem(example.TRAINING, "per_device_train_batch_size", 4)
    fed = []
    compute_loss = example.PlanTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        fed.append((self.run.label, inputs["input_ids"].clone()))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(example.PlanTrainer, "compute_loss", recording)
    ids = np.random.default_rng(0).integers(0, V, 64 * 14)
    data = example.Blocks(ids)  # 14 blocks: batches 4, 4, 4, 2, then the next epoch's 4
    grid = dict(teacher_seeds=[0], student_seeds=[10, 11], alphas=[0.0], temperatures=[1.0],
                conditions=["siddo", "kd", "rcd"])  # fmt: skip
    with kdaudit.plan(tmp_path, num_classes=V, **grid) as plan:
        runs = {r.label: r for r in plan.runs()}
    teacher = example.train(runs["teacher_t0"], data, V)
    models = {label: example.train(run, data, V, teacher if run.needs_teacher else None)
              for label, run in runs.items() if not run.is_teacher}  # fmt: skip
    for label, run in runs.items():  # the Trainer fed the sampler's order, epoch by epoch
        sampler = run.sampler(len(data))
        epochs = [torch.tensor(list(sampler)) for _ in range(2)]
        expected = [*epochs[0].split(4), epochs[1][:4]]
        batches = [x for name, x in fed if name == label]
        assert len(batches) == 5 and [len(b) for b in batches] == [4, 4, 4, 2, 4]
        for got, idx in zip(batches, expected, strict=True):
            assert torch.equal(got, data.blocks[idx]), label
    for seed in (10, 11):
        siddo = models[f"siddo_t0_s{seed}"].state_dict()
        for other in (f"kd_a0_T1_t0_s{seed}", f"rcd_a0_T1_t0_s{seed}"):
            state = models[other].state_dict()
            assert all(torch.equal(state[k], siddo[k]) for k in siddo), other
    a, b = models["siddo_t0_s10"].state_dict(), models["siddo_t0_s11"].state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)  # another seed: another data order
