"""Your own training loop under kdaudit's protocol: a Hugging Face `Trainer` self-distils a
tiny GPT-2 on TinyShakespeare (characters), and kdaudit supplies the paired grid, each run's
data order and loss, and the verdict. Did the students learn the teacher's function, and
its mistakes?

    pip install 'kdaudit[hf]'
    python examples/hf_trainer_distillation.py --data-dir ../shared/data

The data directory holds tinyshakespeare/input.txt (default $KDAUDIT_DATA). One teacher,
5 student seeds, SIDDO, KD and RCD at alpha 0.9 (16 runs) train on the CPU in minutes;
rerunning resumes from the runs already recorded in --out.

What this loop keeps so that kdaudit's paired tests hold (README, "Your own training loop"):
the initial weights (torch.manual_seed(run.init_seed) right before building the model), the
data order (the Trainer's sampler is run.sampler), and the dropout draws (the Trainer seeds
torch with TrainingArguments.seed = run.data_seed, and the teacher runs in eval mode, so
every condition draws the same masks). Only the loss differs: run.loss.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging

import kdaudit
from kdaudit.data import default_data_dir
from kdaudit.store.tables import accuracy_by_condition

BLOCK = 64  # tokens per training example and per test window
TEST_BLOCKS = 128  # test windows from the start of the last 10% of the text: 8,064 positions
MODEL = dict(n_layer=2, n_head=4, n_embd=64, n_positions=BLOCK, resid_pdrop=0.1,
             embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=None, eos_token_id=None)  # fmt: skip
TRAINING = dict(max_steps=150, per_device_train_batch_size=32, learning_rate=3e-3,
                weight_decay=0.0)  # fmt: skip


class Blocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of BLOCK token ids."""

    def __init__(self, ids: np.ndarray):
        self.blocks = torch.from_numpy(ids[: len(ids) // BLOCK * BLOCK].reshape(-1, BLOCK))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


class PlanTrainer(Trainer):
    """A Trainer that trains one run of a kdaudit plan: the run's data order, its loss."""

    def __init__(self, *args, run, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run, self.teacher = run, teacher

    def _get_train_sampler(self, train_dataset=None):
        return self.run.sampler(len(train_dataset or self.train_dataset))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]  # (B, T)
        logits = model(input_ids=ids).logits[:, :-1]  # (B, T - 1, V): t predicts t + 1
        teacher = None
        if self.run.needs_teacher:
            with torch.no_grad():
                teacher = self.teacher(input_ids=ids).logits[:, :-1]
        loss = self.run.loss(logits, ids[:, 1:], teacher)
        return (loss, {"logits": logits}) if return_outputs else loss


def characters(data_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Train and test token ids (first 90% / last 10% of the text) and the vocabulary size."""
    path = data_dir / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        raise SystemExit(f"no {path}: give --data-dir, the folder holding tinyshakespeare/")
    text = path.read_text(encoding="utf-8")
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}  # 65 characters
    ids = np.fromiter((vocab[c] for c in text), dtype=np.int64, count=len(text))
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(vocab)


def new_model(run, vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(run.init_seed)  # self-distillation: the teacher's initial weights
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, **MODEL))


def train(run, data: Blocks, vocab_size: int, teacher=None) -> GPT2LMHeadModel:
    model = new_model(run, vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, seed=run.data_seed, use_cpu=True, report_to="none",
            save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False, **TRAINING,
        )  # fmt: skip
        trainer = PlanTrainer(model=model, args=args, train_dataset=data, run=run,
                              teacher=teacher)  # fmt: skip
        trainer.train()
    return model.eval()


def test_outputs(model, test: Blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, T - 1, V) of every test position with a next token in its block, labels."""
    with torch.no_grad():
        return model(input_ids=test.blocks).logits[:, :-1], test.blocks[:, 1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--out", type=Path, default=Path("runs/hf_trainer_distillation"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy 2-core machine one thread "
                        "trained this model 7x faster than two)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    start = time.perf_counter()
    train_ids, test_ids, vocab_size = characters(args.data_dir)
    data, test = Blocks(train_ids), Blocks(test_ids[: TEST_BLOCKS * BLOCK])
    plan = kdaudit.plan(
        args.out, teacher_seeds=[0], student_seeds=range(10, 15), alphas=[0.9],
        temperatures=[1.0], conditions=["siddo", "kd", "rcd"], num_classes=vocab_size,
        name="hf_trainer_distillation", recipe={"model": MODEL, "training": TRAINING,
                                                "block": BLOCK, "test_blocks": TEST_BLOCKS},
    )  # fmt: skip
    teachers = {}
    for run in plan.pending():
        print(f"training {run.label}", flush=True)
        teacher = teachers.get(run.teacher_seed) or load_teacher(args.out, run, vocab_size)
        model = train(run, data, vocab_size, teacher if run.needs_teacher else None)
        if run.is_teacher:  # kept before it is recorded: a resumed plan needs its weights
            model.save_pretrained(args.out / f"teacher_{run.teacher_seed}")
            teachers[run.teacher_seed] = model
        run.record(*test_outputs(model, test))
    result = plan.report()
    for t in result.teachers.itertuples():
        print(f"teacher seed {t.teacher_seed}: test accuracy {t.test_accuracy:.4f}")
    for r in accuracy_by_condition(result.runs).itertuples():
        alpha = f" alpha={r.alpha:g}" if r.alpha == r.alpha else ""
        print(f"  {r.condition}{alpha}: test accuracy {r.mean:.4f} ± {r.sem:.4f} (n={r.n})")
    print("\n" + "\n".join(result.verdict_lines()))
    print(f"\nreport: {result.report}\nwall time {time.perf_counter() - start:.0f} s")


def load_teacher(out: Path, run, vocab_size: int):
    """The teacher a previous (interrupted) call trained and saved, or None."""
    folder = out / f"teacher_{run.teacher_seed}"
    return GPT2LMHeadModel.from_pretrained(folder).eval() if folder.is_dir() else None


if __name__ == "__main__":
    main()
