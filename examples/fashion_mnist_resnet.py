"""Audit your own distillation with kdaudit.audit(): a torchvision ResNet-18 teacher (trained
here, as you would have trained yours) distilled into a smaller torchvision ResNet-10 on
Fashion-MNIST. Did the students learn the teacher's function, and its mistakes?

    python examples/fashion_mnist_resnet.py --data-dir ../shared/data

The data directory holds fashion-mnist/*-ubyte.gz (the four IDX files); default $KDAUDIT_DATA.
The defaults (2,000 training images, 5 student seeds, one KD setting) finish in about ten
minutes on two CPU cores; rerunning resumes from the runs already in --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, ResNet

import kdaudit
from kdaudit.data import default_data_dir
from kdaudit.data.vision import read_idx
from kdaudit.store.tables import accuracy_by_condition

CLASSES = 10


def grayscale(model: ResNet) -> ResNet:
    """torchvision's ResNets take RGB: a one-channel stem for 28x28 grayscale images."""
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def teacher_net(seed: int) -> nn.Module:
    return grayscale(resnet18(num_classes=CLASSES))


def student_net(seed: int) -> nn.Module:
    """ResNet-10: torchvision's ResNet with one basic block per stage (4.9M parameters,
    against ResNet-18's 11.2M). kdaudit seeds torch's RNG with `seed` before calling this."""
    return grayscale(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES))


def fashion_mnist(data_dir: Path, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of a split: inputs (n, 1, 28, 28) scaled to [-1, 1], labels (n,)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = data_dir / "fashion-mnist"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")[:n]
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")[:n]
    x = torch.from_numpy(images.copy()).float().div(255).sub(0.5).div(0.5).unsqueeze(1)
    return x, torch.from_numpy(labels.copy()).long()


def pretrained_teacher(path: Path, train: tuple[torch.Tensor, torch.Tensor], epochs: int):
    """Stands in for your own trained teacher: trained once with a plain loop, then reloaded,
    so that a rerun finds the same weights (and kdaudit resumes)."""
    model = teacher_net(0)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = train
    model.train()
    for epoch in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"teacher epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=None, help="default: $KDAUDIT_DATA")
    p.add_argument("--out", type=Path, default=Path("runs/example_fashion_mnist_resnet"))
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3, help="student epochs")
    p.add_argument("--seeds", type=int, default=5, help="student seeds (10, 11, ...)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.9])
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(1)  # bitwise reproducible CPU runs; kdaudit's runs use 1 thread too
    data_dir = args.data_dir or default_data_dir()
    train = fashion_mnist(data_dir, "train", args.n_train)
    test = fashion_mnist(data_dir, "test", args.n_test)
    teacher = pretrained_teacher(args.out / "resnet18_teacher.pt", train, args.teacher_epochs)

    result = kdaudit.audit(
        student_net, train, test, teacher=teacher, out=args.out,
        student_seeds=tuple(range(10, 10 + args.seeds)), alphas=tuple(args.alphas),
        conditions=("siddo", "kd", "rcd"), optimizer="adam", lr=1e-3, batch_size=128,
        epochs=args.epochs, device=args.device, name="fashion_mnist_resnet18_to_resnet10",
    )  # fmt: skip

    t = result.teachers.iloc[0]
    print(f"\nteacher (pretrained ResNet-18): test accuracy {t.test_accuracy:.4f}")
    for r in accuracy_by_condition(result.runs).itertuples():
        alpha = "" if r.alpha != r.alpha else f" alpha={r.alpha:g}"  # NaN: no alpha
        print(f"  {r.condition}{alpha}: test accuracy {r.mean:.4f} ± {r.sem:.4f} (n={r.n})")
    print()
    for line in result.verdict_lines():
        print(line)
    print(f"\nreport: {result.report}")
    print(f"runs trained now: {result.outcome.completed}, reused: {result.outcome.skipped}; "
          f"wall time {time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
