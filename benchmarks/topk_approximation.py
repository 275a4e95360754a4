"""How far `kdaudit compare` on top-k files is from the full-logit compare, on real models.

    python benchmarks/topk_approximation.py [--dir runs/tinyshakespeare-topk]
        [--data-dir ../shared/data] [--ks 1,5,20,100] [--dtype float32] [--work DIR]

Trains (or resumes) a small TinyShakespeare self-distillation audit with kdaudit's own engine
when DIR holds none: configs/tinyshakespeare.yaml at 300 steps, student seeds 10-17, KD and
RCD at alpha 0.5 and 0.9 (41 character-level GPTs, V = 65; about 20 minutes on 2 CPU cores
with --workers 2). Then it writes each run's stored test logits as top-k files (topk_ids
int32, topk_logprobs in --dtype, shuffled within each row, as a server returns them) for
every k (capped at V: a k >= V file holds the whole distribution), compares them, and prints
per k and metric the largest and mean absolute error over the student runs against the
full-logit compare, and whether any verdict, asymmetry label or significance decision
changed. A last row compares k = V files in float64, where every metric must equal the
full-logit one to 1e-9. The table is written to WORK/topk_approximation.csv as each k
completes (a rerun with the same --work skips the k already there), and each compare's
runs.csv is kept as WORK/runs_top{k}_{dtype}.csv.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import log_softmax

from kdaudit.compare import compare
from kdaudit.config import load_config
from kdaudit.data import load_data
from kdaudit.metrics import METRICS, TOPK_MARK

TRAIN = [
    "configs/tinyshakespeare.yaml",
    "--set", "train.max_steps=300",
    "--set", "protocol.student_seeds=[10,11,12,13,14,15,16,17]",
    "--set", "protocol.alphas=[0.5,0.9]",
    "--workers", "2",
]  # fmt: skip
VERDICT = ["verdict", "n_significant", "asymmetry", "best_control"]


def train(run_dir: Path, data_dir: Path) -> None:
    """The audit (resumed if partly there), through kdaudit's CLI."""
    command = [sys.executable, "-m", "kdaudit.cli", "run", *TRAIN, "--out", str(run_dir)]
    subprocess.run([*command, "--data-dir", str(data_dir)], check=True)


def full_manifest(run_dir: Path, data_dir: Path, work: Path) -> tuple[Path, list[dict]]:
    """The manifest of the stored test logits, and one entry per run (spec and file)."""
    config = load_config(run_dir / "experiment.yaml")
    np.save(work / "labels.npy", load_data(config.data, data_dir).labels("test").numpy())
    runs = []
    for spec_file in sorted(run_dir.glob("runs/*/spec.json")):
        spec = json.loads(spec_file.read_text())
        runs.append({**spec, "logits": spec_file.parent / "test_logits.npy"})
    return write_manifest(work / "full.csv", runs, [r["logits"] for r in runs]), runs


def write_manifest(path: Path, runs: list[dict], files: list[Path]) -> Path:
    lines = ["role,alpha,temperature,seed,teacher_seed,path", "labels,,,,,labels.npy"]
    for run, file in zip(runs, files, strict=True):
        teacher = run["condition"] == "teacher"
        seed = run["teacher_seed"] if teacher else run["student_seed"]
        alpha = "" if run["alpha"] is None else run["alpha"]
        temperature = "" if run["temperature"] is None else run["temperature"]
        teacher_seed = "" if teacher else run["teacher_seed"]
        lines.append(f"{run['condition']},{alpha},{temperature},{seed},{teacher_seed},{file}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_topk(logits: Path, out: Path, k: int, dtype: str, seed: int) -> Path:
    """The top-k file of a stored (N, V) logits file, ids shuffled within each row."""
    z = np.load(logits).astype(np.float64)
    order = np.argsort(-z, axis=1, kind="stable")[:, :k]  # ties: the lower id, as kdaudit
    ids = np.random.default_rng(seed).permuted(order, axis=1)
    log_p = np.take_along_axis(log_softmax(z, axis=1), ids, axis=1)
    np.savez(out, topk_ids=ids.astype(np.int32), topk_logprobs=log_p.astype(dtype),
             vocab_size=np.array(z.shape[1]))  # fmt: skip
    return out


def audit(manifest: Path, out: Path):
    start = time.perf_counter()
    result = compare(manifest, out)
    return result, time.perf_counter() - start


def errors(full, topk) -> dict[str, tuple[float, float]]:
    """Metric -> (max, mean) absolute error over the student runs (NaN-aware)."""
    a = full.runs.pivot(index="run_id", columns="metric", values="value")
    b = topk.runs.pivot(index="run_id", columns="metric", values="value")
    out = {}
    for metric in a.columns:
        diff = (b[metric] - a[metric]).abs()
        out[metric] = (float(diff.max()), float(diff.mean()))
    teacher_loss = abs(topk.teachers.test_loss.iloc[0] - full.teachers.test_loss.iloc[0])
    out["teacher test_loss"] = (float(teacher_loss), float(teacher_loss))
    return out


def changes(full, topk) -> list[str]:
    """Every verdict column and every significance decision that differs."""
    a, b = full.verdicts, topk.verdicts
    found = []
    for column in (c for c in VERDICT if c in a.columns):
        for i in range(len(a)):
            if a[column].iloc[i] != b[column].iloc[i]:
                setting = f"alpha={a.alpha.iloc[i]:g}"
                found.append(f"{setting} {column}: {a[column].iloc[i]} -> {b[column].iloc[i]}")
    ta, tb = full.analysis.tests_frame(), topk.analysis.tests_frame()
    flips = ta.significant.to_numpy() != tb.significant.to_numpy()
    for _, row in ta[flips].iterrows():
        found.append(f"alpha={row.alpha:g} vs {row.control} {row.metric}: significant "
                     f"{row.significant} -> {not row.significant}")  # fmt: skip
    return found


def run(args) -> pd.DataFrame:
    work = Path(args.work or tempfile.mkdtemp(prefix="topk_approx_"))
    work.mkdir(parents=True, exist_ok=True)
    if not (args.dir / "experiment.yaml").is_file() or args.train:
        train(args.dir, args.data_dir)
    manifest, runs = full_manifest(args.dir, args.data_dir, work)
    full, seconds = audit(manifest, work / "out_full")  # a rerun reads the metrics cache
    v = int(np.load(runs[0]["logits"], mmap_mode="r").shape[1])
    print(f"{len(runs)} runs, V={v}, full-logit compare {seconds:.1f} s")
    print("\n".join(full.verdict_lines()))
    table_file = work / "topk_approximation.csv"
    done = pd.read_csv(table_file) if table_file.is_file() else pd.DataFrame()
    rows = done.to_dict("records")
    cases = [(min(k, v), args.dtype, k) for k in args.ks] + [(v, "float64", v)]
    for k, dtype, asked in cases:
        if len(done) and ((done.k == k) & (done.dtype == dtype)).any():
            continue
        folder = work / f"top{k}_{dtype}"
        folder.mkdir(exist_ok=True)
        files = [write_topk(r["logits"], folder / f"{i}.npz", k, dtype, i)
                 for i, r in enumerate(runs)]  # fmt: skip
        shutil.copy(work / "labels.npy", folder / "labels.npy")
        topk, seconds = audit(write_manifest(folder / "m.csv", runs, files), folder / "out")
        marked = set(next((n.split(": ", 1)[1].split(" (")[0].split(", ")
                           for n in topk.notes if n.startswith(TOPK_MARK)), []))  # fmt: skip
        found = changes(full, topk)
        for metric, (worst, mean) in errors(full, topk).items():
            rows.append(dict(k=k, asked=asked, dtype=dtype, metric=metric, max_abs_error=worst,
                             mean_abs_error=mean, marked=metric in marked,
                             verdict_changes=len(found), seconds=seconds))  # fmt: skip
        print(f"\nk={k} ({dtype}{', asked ' + str(asked) if asked != k else ''}): compare "
              f"{seconds:.1f} s; {len(found)} verdict/significance change(s)")  # fmt: skip
        for line in found:
            print(f"  {line}")
        topk.runs.to_csv(work / f"runs_top{k}_{dtype}.csv", index=False)
        pd.DataFrame(rows).to_csv(table_file, index=False)
        shutil.rmtree(folder)  # up to 2.4 GB each
    table = pd.DataFrame(rows)
    print_table(table)
    print(f"\nwritten: {work / 'topk_approximation.csv'}")
    return table


def print_table(table: pd.DataFrame) -> None:
    """Max (mean) absolute error per metric (rows) and k (columns); * = marked top-k approx."""
    order = [m.name for m in METRICS.entries() if not m.topk_only] + ["teacher test_loss"]
    table = table.assign(case=[f"k={k} {d}" for k, d in zip(table.k, table.dtype, strict=True)])
    cases = list(dict.fromkeys(table.case))
    print("\n| metric | " + " | ".join(cases) + " |")
    print("|---|" + "---|" * len(cases))
    for metric in order:
        cells = []
        for case in cases:
            row = table[(table.case == case) & (table.metric == metric)].iloc[0]
            mark = "*" if row.marked else ""
            cells.append(f"{row.max_abs_error:.2e} ({row.mean_abs_error:.1e}){mark}")
        print(f"| {metric} | " + " | ".join(cells) + " |")
    changes = table.drop_duplicates("case").set_index("case").verdict_changes
    print("| verdict/significance changes | " + " | ".join(str(changes[c]) for c in cases) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("runs/tinyshakespeare-topk"))
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--ks", type=lambda s: [int(k) for k in s.split(",")],
                        default=[1, 5, 20, 100])  # fmt: skip
    parser.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    parser.add_argument("--work", help="folder for the manifests and the table (default: temp)")
    parser.add_argument("--train", action="store_true", help="run (resume) the audit first")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
