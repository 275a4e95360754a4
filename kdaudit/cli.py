"""`kdaudit` command line: parses arguments, calls the Python API, prints.

Only argparse and the standard library load before a command runs: `--help`, `--version`
and argument errors answer at once, and each command imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kdaudit import __version__
from kdaudit.errors import ConfigError

DESCRIPTION = """\
Audit knowledge distillation: did the student learn its teacher's knowledge (and its
mistakes), or only a regularisation effect? kdaudit trains a teacher, KD students and
control students on paired seeds, measures how alike teacher and students behave, and tests
it against the controls."""

EPILOG = """\
examples:
  kdaudit run configs/mnist1d.yaml              the default audit (71 small runs, CPU)
  kdaudit run configs/mnist1d.yaml --smoke      check a config in about a minute
  kdaudit run CONFIG --set train.epochs=5       change any config value
  kdaudit status runs/mnist1d                   what is complete, pending, failed
  kdaudit report runs/mnist1d                   (re)write runs/mnist1d/report/
  kdaudit export runs/mnist1d                   a compare manifest of its test logits
  kdaudit compare manifest.csv                  audit saved test logits, no training
  kdaudit list models                           what a config can name

`kdaudit COMMAND --help` describes a command's options."""

RUN_EPILOG = """\
examples:
  kdaudit run configs/mnist1d.yaml
  kdaudit run configs/mnist1d.yaml --smoke --out runs/try
  kdaudit run configs/fsdd.yaml --data-dir ~/data --set protocol.alphas=[0.5]

Rerunning the same command resumes: complete runs are kept and skipped. A different config
into a run directory that holds another is refused unless --force-new-config is given."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try
        return code
    except BrokenPipeError:
        # the reader went away (`kdaudit status --json | head -1`): nothing left to say.
        # Python flushes stdout again at exit; point it at devnull so that fails silently.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ConfigError, FileNotFoundError, RuntimeError) as err:
        print(f"kdaudit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdaudit: interrupted; complete runs are kept, rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdaudit", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--version", action="version", version=f"kdaudit {__version__}")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    _run_parser(sub)

    report = sub.add_parser("report", help="analyse a run directory and write DIR/report/",
                            description="Analyse the complete runs of a run directory (also "
                            "of an unfinished grid) and (re)write DIR/report/.")  # fmt: skip
    report.add_argument("dir", type=Path)
    report.add_argument("--data-dir", type=Path,
                        help="dataset directory, for reports that read the test data "
                             "(targeted error transfer; default: $KDAUDIT_DATA)")  # fmt: skip
    report.add_argument("--beside", type=Path, action="append", default=[], metavar="DIR",
                        help="another audit's run directory whose teachers' train loss and "
                             "transfer go beside this one's (teacher regimes; repeatable)")  # fmt: skip
    report.set_defaults(func=_report)

    status = sub.add_parser("status", help="complete / pending / failed runs of a run directory")
    status.add_argument("dir", type=Path)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    compare = sub.add_parser("compare", help="audit saved test logits listed in a manifest CSV")
    compare.add_argument("manifest", type=Path)
    compare.add_argument("--out", type=Path, help="output folder (default: runs/<manifest name>)")
    compare.set_defaults(func=_compare)

    export = sub.add_parser("export", help="write a compare manifest of a run directory's "
                            "test logits")  # fmt: skip
    export.add_argument("dir", type=Path, help="a run directory of `kdaudit run`")
    export.add_argument("--out", type=Path, help="the manifest CSV (default: DIR/manifest.csv)")
    export.add_argument("--data-dir", type=Path,
                        help="dataset directory, read only when DIR holds no test_labels.npy "
                             "(default: $KDAUDIT_DATA)")  # fmt: skip
    export.set_defaults(func=_export)

    listing = sub.add_parser("list", help="the datasets, models, conditions and shipped "
                             "configs a config can name")  # fmt: skip
    listing.add_argument("kind", nargs="?", choices=("datasets", "models", "conditions",
                         "configs"), help="one kind (default: all)")  # fmt: skip
    listing.set_defaults(func=_list)
    _logits_parser(sub)
    return p


def _run_parser(sub) -> None:
    run = sub.add_parser("run", help="run (or resume) an audit from a YAML config",
                         description="Run (or resume) the audit a YAML config describes, then "
                         "write its report.", epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    run.add_argument("config", type=Path)
    run.add_argument("--out", type=Path, help="run directory (default: runs/<config name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.epochs=5 (repeatable)")  # fmt: skip
    run.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    run.add_argument("--data-dir", type=Path,
                     help="dataset directory (default: the config's data_dir, else $KDAUDIT_DATA)")  # fmt: skip
    run.add_argument("--cache-dir", type=Path,
                     help="where derived arrays (generated, decoded, features) are kept "
                          "(default: $KDAUDIT_CACHE, else ~/.cache/kdaudit)")  # fmt: skip
    run.add_argument("--smoke", action="store_true",
                     help="a tiny grid and training (about a minute) to check the config works")  # fmt: skip
    run.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    run.add_argument("--force-new-config", action="store_true",
                     help="run this config into a run directory that holds another one's "
                          "runs (they are kept; the report is of this config)")  # fmt: skip
    run.add_argument("--executor", default="local", metavar="NAME",
                     help="a registered executor: local (this machine, the default) or ray "
                          "(a Ray cluster)")  # fmt: skip
    run.add_argument("--workers", type=int, metavar="N",
                     help="runs at once: local worker processes (default: one per CPU core, "
                          "or per GPU; 1: one at a time in this process, bitwise the same "
                          "results); ray: CPUs of the local cluster in runs (default: all "
                          "cores)")  # fmt: skip
    run.add_argument("--threads", type=int, default=1, metavar="N",
                     help="torch CPU threads per run (default 1; CPU results are bitwise "
                          "reproducible for a fixed value)")  # fmt: skip
    run.add_argument("--stack", type=int, default=1, metavar="N",
                     help="train up to N runs of one teacher at once as one stacked model, "
                          "one student seed's conditions together, in this process (default "
                          "1: one at a time, except that on the CPU the worker processes "
                          "stack a seed's MLP students, with the bits each has alone)")  # fmt: skip
    run.add_argument("--address", metavar="ADDR",
                     help="ray: address of an existing cluster (default: start a local one)")  # fmt: skip
    run.add_argument("--max-retries", type=int, default=3, metavar="N",
                     help="reruns of a run whose worker process died (default 3); "
                          "runs that raise are recorded as failed, not rerun")  # fmt: skip
    run.set_defaults(func=_run)


def _logits_parser(sub) -> None:
    p = sub.add_parser("logits", help="score a saved Hugging Face causal LM on a corpus "
                       "(test logits for kdaudit compare)")  # fmt: skip
    p.add_argument("model_dir", type=Path, help="a folder written by save_pretrained")
    p.add_argument("corpus", type=Path, help=".txt, .jsonl (a text field) or token ids .npy")
    p.add_argument("--out", type=Path, required=True,
                   help="FILE.npy (full logits) or, with --top-k, FILE.npz")  # fmt: skip
    p.add_argument("--top-k", type=int, metavar="K", help="store the top-k log-probabilities")
    p.add_argument("--labels", type=Path, metavar="LABELS.npy",
                   help="also write the next-token ids (N, T) of the same positions")  # fmt: skip
    p.add_argument("--context", type=int, metavar="N",
                   help="tokens per window (default: the model's maximum, at most 1024)")  # fmt: skip
    p.add_argument("--stride", type=int, metavar="N",
                   help="new positions scored per window (default: context / 2)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="windows per forward pass (default 8)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: every core; on a busy machine one "
                        "thread can be several times faster)")  # fmt: skip
    p.add_argument("--reference", type=Path, metavar="FILE",
                   help="refuse unless the tokenizer, token ids and vocabulary match this file "
                        "of kdaudit logits (say, the teacher's)")  # fmt: skip
    p.add_argument("--manifest", type=Path, metavar="CSV",
                   help="check against every model of this compare manifest, then append "
                        "this model's row (needs --role and --seed)")  # fmt: skip
    p.add_argument("--role", help="the manifest role: teacher, siddo, kd, rcd, ls, ...")
    p.add_argument("--seed", type=int, help="student seed (a teacher: its seed)")
    p.add_argument("--alpha", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--teacher-seed", type=int, help="the student's teacher (default 0)")
    p.set_defaults(func=_logits)


def _run(args: argparse.Namespace) -> int:
    from kdaudit import api
    from kdaudit.config import load_config

    load_config(args.config, args.overrides)  # a config error answers before torch loads
    from kdaudit.executors.progress import default_reporter

    if args.cache_dir is not None:
        from kdaudit.data.cache import use_cache_dir

        use_cache_dir(args.cache_dir)
    executor = api.ExecutorConfig(args.executor, workers=args.workers, threads=args.threads,
                              address=args.address, max_retries=args.max_retries,
                              stack=args.stack)  # fmt: skip
    result = api.run(
        args.config, args.out, overrides=args.overrides, device=args.device,
        data_dir=args.data_dir, smoke_test=args.smoke, retry_failed=args.retry_failed,
        reporter=default_reporter(), executor=executor, force_new_config=args.force_new_config,
    )  # fmt: skip
    outcome = result.outcome
    for path in outcome.quarantined:
        print(f"damaged run directory moved aside and redone: {path}")
    print(f"{outcome.completed} runs completed now, {outcome.skipped} were already complete, "
          f"{len(outcome.failed)} failed, {outcome.blocked} blocked by a failed teacher "
          f"(of {outcome.total})")  # fmt: skip
    if outcome.failed:
        print("failed runs are listed by `kdaudit status DIR`; rerun them with --retry-failed")
    if result.analysis is not None:
        _print_result(result)
    return 1 if outcome.failed else 0


def _report(args: argparse.Namespace) -> int:
    from kdaudit import api

    _print_result(api.report(args.dir, args.data_dir, args.beside))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from kdaudit import api

    try:
        result = api.compare(args.manifest, args.out,
                             log=lambda line: print(line, file=sys.stderr))  # fmt: skip
    except api.CompareError as err:
        print(f"kdaudit: error: {err}", file=sys.stderr)
        return 2
    _print_result(result)
    return 0


def _export(args: argparse.Namespace) -> int:
    from kdaudit import api
    from kdaudit.compare import CompareError

    try:
        path, n = api.export(args.dir, args.out, args.data_dir)
    except CompareError as err:
        print(f"kdaudit: error: {err}", file=sys.stderr)
        return 2
    print(f"{path}: {n} runs and the test labels; audit them with `kdaudit compare {path}`")
    return 0


def _list(args: argparse.Namespace) -> int:
    from kdaudit.catalog import KINDS, catalog, describe_setting

    for kind in [args.kind] if args.kind else KINDS:
        print(f"{kind}:")
        for item in catalog(kind):
            print(f"  {item.name:14s} {item.about}" if item.about else f"  {item.name}")
            if item.settings:
                shown = ", ".join(f"{k}={describe_setting(v)}" for k, v in item.settings.items())
                print(f"  {'':14s} settings: {shown}")
    return 0


def _logits(args: argparse.Namespace) -> int:
    from kdaudit import api
    from kdaudit.hf.identity import ManifestRow
    from kdaudit.hf.score import LogitsOptions

    row = None
    if args.role is not None or args.seed is not None:
        if args.role is None or args.seed is None:
            raise ConfigError("give --role and --seed together (the model's manifest row)")
        row = ManifestRow(args.role, args.seed, args.alpha, args.temperature, args.teacher_seed)
    options = LogitsOptions(
        top_k=args.top_k, labels=args.labels, context=args.context, stride=args.stride,
        batch_size=args.batch_size, device=args.device, threads=args.threads,
        reference=args.reference,
        manifest=args.manifest, row=row,
    )  # fmt: skip
    _quiet_transformers()
    with _TokenProgress() as progress:
        result = api.logits(args.model_dir, args.corpus, args.out, options, progress.update)
    if result.tokens:
        print(f"{args.out}: {result.shape} written, {result.tokens} positions in "
              f"{result.seconds:.1f} s ({result.tokens_per_second:.0f} tokens/s)"
              + (f", resumed after batch {result.resumed_at}" if result.resumed_at else ""))  # fmt: skip
    else:
        print(f"{args.out}: complete already ({result.shape})")
    if result.appended:
        print(f"appended to {args.manifest}: {result.row}")
    else:
        print(f"manifest row{'' if row else ' (fill in ROLE and SEED)'}: {result.row}")
    return 0


def _quiet_transformers() -> None:
    """transformers' own bar for loading weights would interleave with ours."""
    try:
        from transformers.utils import logging
    except ImportError:
        return  # kdaudit.hf says how to install it
    logging.disable_progress_bar()


class _TokenProgress:
    """A progress bar over batches of windows, with the positions scored."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

        columns = (*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn())
        self.progress = Progress(*columns, console=Console(stderr=True))
        self.task = None  # started at the first batch: an error before prints one line
        return self

    def update(self, done: int, total: int, tokens: int) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("batches", total=total, completed=done - 1)
        self.progress.update(self.task, completed=done, description=f"{tokens} positions")

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.progress.stop()


def _print_result(result) -> None:
    from kdaudit.api import accuracy_by_condition

    for t in result.teachers.itertuples():
        known = t.train_accuracy == t.train_accuracy  # NaN when only test logits were given
        train = f", train accuracy {t.train_accuracy:.4f}" if known else ""
        print(f"teacher seed {t.teacher_seed}: test accuracy {t.test_accuracy:.4f}{train}")
    for r in accuracy_by_condition(result.runs).itertuples():
        print(f"  {_setting(r)}: test accuracy {r.mean:.4f} ± {r.sem:.4f} (n={r.n})")
    print()
    for plain, evidence in result.plain_verdicts():
        print(plain)
        print(f"  evidence: {evidence}.")
    for fact in result.facts():
        print(f"- {fact}")
    print(f"\nreport: {result.report}")


def _setting(r) -> str:
    parts = [r.condition]
    if r.alpha == r.alpha:  # not NaN
        parts.append(f"alpha={r.alpha:g}")
    if r.temperature == r.temperature:
        parts.append(f"T={r.temperature:g}")
    if r.width == r.width:  # capacity grids only
        parts.append(f"width={r.width:g}")
    if getattr(r, "teacher_label_noise", 0.0):  # a teacher-error sweep's noisy teachers
        parts.append(f"teacher noise={r.teacher_label_noise:g}")
    return " ".join(parts)


def _status(args: argparse.Namespace) -> int:
    from kdaudit import api

    status = api.status(args.dir)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"{args.dir}: {status['complete']} complete, {status['pending']} pending, "
          f"{status['failed']} failed, {status['blocked']} blocked by a failed teacher "
          f"(of {status['total']})")  # fmt: skip
    for name, c in status["conditions"].items():
        print(
            f"  {name:10s} complete {c['complete']:4d}  pending {c['pending']:4d}  "
            f"failed {c['failed']:4d}  blocked {c['blocked']:4d}"
        )
    for f in status["failed_runs"]:
        print(f"  failed {f['run_id']} at step {f['step']}: {f['error']}")
    for c in status["corrupt_runs"]:
        print(f"  damaged {c['run_id']}: {c['problem']} (the next `kdaudit run` redoes it)")
    if status["in_progress"]:
        p = status["in_progress"]
        print(f"  in progress: `kdaudit run` pid {p.get('pid', '?')} on {p.get('host', '?')} "
              f"since {p.get('started_at', '?')}, {len(p['runs_in_flight'])} runs in flight")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
