"""The GPU measurements of the performance issue, as one prepared command for a short lease.

    python benchmarks/gpu_suite.py --out DIR --data-dir DATA [--part all|teacher|throughput]
        [--teacher-seconds 300] [--throughput-seconds 240] [--teacher-precision bf16] [--quick]

Parts, each a subprocess whose output goes to DIR/<name>.log and whose figures end in
DIR/summary.txt (written after every part, so a lease cut short keeps what finished):

- teacher (first): the paper-scale NanoGPT teacher, seed 0, of
  `configs/paper/tinyshakespeare_nanogpt.yaml` through `kdaudit run` (6x384, block 256, batch
  64, 5000 steps; bf16 autocast unless `--teacher-precision fp32`), its test loss and
  accuracy beside the paper's 1.567 and 0.573. A grid needs a student, so the command asks
  for one SIDDO student and is interrupted (as Ctrl-C would, which loses only the run in
  flight) once the teacher's record is complete.
- throughput: `benchmarks/throughput.py --gpu-scale --models resnet18,nanogpt --stack 4`
  (ResNet-18 at 32 px, batch 512; NanoGPT 6x384, block 256, batch 64): examples or tokens a
  second of the plain loop, the engine and a stack of 4, and the engine's MFU against a
  matmul peak measured in the same run, in fp32, bf16, and bf16 with torch.compile.

Each part is capped in wall time (the throughput part's cap is shared among its three
settings); a part cut short is reported as such and the next one starts. The defaults fit
one 600-second call. `--quick` checks the orchestration on the CPU in about a minute (tiny
models, a `--smoke` grid); its figures mean nothing.

On a lent machine whose python3 has torch but not kdaudit (its other needs are there), from
the repository root, with TinyShakespeare copied into an ignored folder that travels
(`mkdir -p .devdata/tinyshakespeare && cp ../shared/data/tinyshakespeare/input.txt
.devdata/tinyshakespeare/`, `.devdata` in .git/info/exclude and in the call's carry):

    PYTHONPATH=. python3 benchmarks/gpu_suite.py --out $OUT --data-dir .devdata
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIG = ROOT / "configs" / "paper" / "tinyshakespeare_nanogpt.yaml"
PAPER_TEACHER = {"test_loss": 1.567, "test_accuracy": 0.573}  # seed 0 (PROTOCOL section 9)
SETTINGS = [("fp32", False), ("bf16", False), ("bf16", True)]  # (precision, compile)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the logs and summary.txt")
    p.add_argument("--data-dir", help="holds tinyshakespeare/input.txt (the teacher part)")
    p.add_argument("--part", default="all", choices=("all", "throughput", "teacher"))
    p.add_argument("--teacher-seconds", type=float, default=300.0, help="the teacher part's cap")
    p.add_argument(
        "--throughput-seconds",
        type=float,
        default=240.0,
        help="the throughput part's cap, shared among its settings",
    )
    p.add_argument("--teacher-precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--quick", action="store_true", help="check the script on the CPU")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: list[str] = [_machine()]
    _write(out, summary)
    if args.part in ("all", "teacher"):
        if args.data_dir is None:
            p.error("the teacher part needs --data-dir (a folder holding tinyshakespeare/)")
        summary += teacher(out, Path(args.data_dir), args.teacher_precision,
                           args.teacher_seconds, args.quick)  # fmt: skip
        _write(out, summary)
    if args.part in ("all", "throughput"):
        summary += throughput(out, args.throughput_seconds, args.quick)
        _write(out, summary)
    print("\n".join(summary))


def throughput(out: Path, budget: float, quick: bool) -> list[str]:
    """benchmarks/throughput.py for each precision, compile off and on; its ratio lines."""
    lines = []
    for precision, compiled in SETTINGS:
        name = f"throughput_{precision}{'_compile' if compiled else ''}"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--stack", "4",
               "--precision", precision] + (["--compile"] if compiled else [])  # fmt: skip
        cmd += (["--device", "cpu", "--models", "mlp", "--steps", "3"] if quick else
                ["--device", "cuda", "--gpu-scale", "--models", "resnet18,nanogpt",
                 "--steps", "30"])  # fmt: skip
        code, seconds, text = _run(cmd, out / f"{name}.log", budget / len(SETTINGS))
        kept = [ln for ln in text.splitlines() if ln.startswith(ROWS)]
        lines.append(f"{name}: {_ended(code, seconds)}")
        lines += [f"  {ln}" for ln in kept]
    return lines


ROWS = ("device", "model ", "mlp ", "resnet18 ", "nanogpt ", "ratio", "load")  # throughput's


def teacher(out: Path, data_dir: Path, precision: str, budget: float, quick: bool) -> list[str]:
    """The paper-scale NanoGPT teacher of seed 0, stopped after the teacher's run."""
    store = out / "teacher_grid"
    cmd = [sys.executable, "-m", "kdaudit.cli", "run", str(PAPER_CONFIG), "--out", str(store),
           "--data-dir", str(data_dir), "--cache-dir", str(out / "cache"),
           *_sets(["protocol.teacher_seeds=[0]", "protocol.student_seeds=[10]",
                   "protocol.conditions=[siddo]", f"train.precision={precision}"])]  # fmt: skip
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "data.block_size=32"]
    cmd += ["--smoke", "--device", "cpu", *_sets(tiny)] if quick else ["--device", "cuda"]
    code, seconds, _ = _run(cmd, out / "teacher.log", budget, until=lambda: _teacher(store))
    record = _teacher(store)
    if record is None:
        return [f"teacher: {_ended(code, seconds)}; no complete teacher record in {store}"]
    metrics = record["metrics"]
    lines = [f"teacher: {_ended(code, seconds)}; trained {record['steps']} steps in "
             f"{record['train_seconds']:.1f} s on {record['device']} ({record['engine']})"]  # fmt: skip
    for key, paper in PAPER_TEACHER.items():
        lines.append(f"  {key} {metrics[key]:.4f} (paper, seed 0: {paper})")
    return lines


def _sets(settings: list[str]) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def _teacher(store: Path) -> dict | None:
    """The grid's teacher record once it is complete, else None (also before the grid starts)."""
    from kdaudit.protocol import expand
    from kdaudit.store import RunStore

    runs = RunStore(store)
    if not (store / "experiment.yaml").is_file():
        return None
    (teacher,) = expand(runs.load_experiment()).teachers
    return runs.record(teacher.run_id) if runs.is_complete(teacher.run_id) else None


def _run(cmd: list[str], log: Path, budget: float, until=None) -> tuple[int | str, float, str]:
    """Run `cmd` with its output in `log` until it ends, `budget` seconds pass (then it is
    killed) or `until()` is true (then it is interrupted as Ctrl-C would). Returns its exit
    code (or "timed out" / "stopped"), its seconds and its output."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        code: int | str | None = None
        while code is None:
            try:
                code = proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                if until is not None and until():
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    code = "stopped"
                elif time.perf_counter() - start > budget:
                    proc.kill()
                    proc.wait()
                    code = "timed out"
    return code, time.perf_counter() - start, log.read_text()


def _ended(code: int | str, seconds: float) -> str:
    how = {0: "done", "stopped": "done, then stopped", "timed out": "TIMED OUT"}
    return f"{how.get(code, f'FAILED (exit {code})')} in {seconds:.0f} s"


def _machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"torch {torch.__version__}, {gpu}, load average {os.getloadavg()[0]:.2f}"


def _write(out: Path, summary: list[str]) -> None:
    (out / "summary.txt").write_text("\n".join(summary) + "\n")


if __name__ == "__main__":
    main()
