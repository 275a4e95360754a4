"""Score a saved Hugging Face causal LM on a corpus: `kdaudit logits` and `kdaudit.api.logits`.

The corpus (kdaudit.hf.corpus) is cut into windows (kdaudit.hf.windows) that score every
position with a next token exactly once; batches of windows go through the model in eval
mode (bf16 on a GPU, fp32 on the CPU) and each kept position's fp32 logits, or its top-k
natural-log probabilities (log-softmax over the whole vocabulary in fp32), are streamed to
disk (kdaudit.hf.output).
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from kdaudit.hf import LogitsError, require_transformers
from kdaudit.hf import identity as ident
from kdaudit.hf.corpus import load_corpus
from kdaudit.hf.output import Output
from kdaudit.hf.windows import Window, batches

DEFAULT_CONTEXT = 1024  # at most, when the model allows more (decision: memory per window)
# seconds between commits of the batches on disk (each an fsync): a kill loses at most this
COMMIT_SECONDS = 2.0
# (batches done, batches in all, tokens scored by this call so far)
BatchHook = Callable[[int, int, int], None]


@dataclass(frozen=True)
class LogitsOptions:
    top_k: int | None = None  # None: full logits (.npy); k: top-k log-probabilities (.npz)
    labels: Path | None = None  # write the next-token ids (N, P) here
    context: int | None = None  # tokens per window; None: the model's maximum, at most 1024
    stride: int | None = None  # new positions per window; None: context // 2
    batch_size: int = 8  # windows per forward pass
    device: str = "auto"  # auto | cpu | cuda[:N]
    threads: int | None = None  # torch CPU threads (None: torch's default, every core)
    reference: Path | None = None  # a file of `kdaudit logits` this one must be comparable with
    manifest: Path | None = None  # a compare manifest to check against and append `row` to
    row: ident.ManifestRow | None = None  # this model's manifest row


@dataclass(frozen=True)
class LogitsResult:
    out: Path
    labels: Path | None
    shape: tuple[int, ...]  # of the logits or top-k arrays: (N, P, V) or (N, P, k)
    vocab_size: int
    tokens: int  # positions scored by this call (0: the file was complete already)
    seconds: float  # of scoring in this call
    resumed_at: int  # batches found on disk at the start
    batches: int
    row: str  # the manifest row (CSV), as appended, or with ROLE and SEED to fill in
    appended: bool

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def score(
    model_dir: str | Path,
    corpus: str | Path,
    out: str | Path,
    options: LogitsOptions = LogitsOptions(),
    on_batch: BatchHook | None = None,
) -> LogitsResult:
    """Write the model's logits on the corpus to `out` (resuming a run cut short)."""
    model_dir, out = Path(model_dir), Path(out)
    _check_paths(model_dir, out, options)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    tokenizer = _tokenizer(model_dir)
    ids = load_corpus(corpus, tokenizer)  # (N, L)
    device = _device(options.device)
    model = _model(model_dir, device)
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    _check_ids(ids, vocab_size, corpus)
    if options.top_k is not None and options.top_k > vocab_size:
        raise LogitsError(f"--top-k {options.top_k} exceeds the vocabulary ({vocab_size})")
    context, stride = _window(model, options)
    labels = ids[:, 1:]  # (N, P) next-token ids
    mine = ident.Identity(ident.tokenizer_sha256(tokenizer), ident.tokens_sha256(ids),
                          tuple(ids.shape), vocab_size)  # fmt: skip
    _check_identity(mine, labels, model_dir, options)
    plan = batches(ids.shape[0], ids.shape[1], context, stride, options.batch_size)
    key = {"model": _model_digest(model_dir), **mine.to_dict(), "context": context,
           "stride": stride, "top_k": options.top_k, "batch_size": options.batch_size,
           "device": device.type, "dtype": str(_dtype(device))}  # fmt: skip
    output = Output(out, ids.shape[0], labels.shape[1], vocab_size, options.top_k, key)
    done, tokens, seconds = len(plan), 0, 0.0
    if not output.is_complete():
        done = output.open()
        start = time.perf_counter()
        tokens = _run(model, ids, plan, done, output, options.top_k, device, on_batch)
        seconds = time.perf_counter() - start
        output.finish(_sidecar(model_dir, corpus, mine, tokens, seconds, device))
    if options.labels is not None:
        _write_labels(options.labels, labels)
    row, appended = _row(options, out, mine)
    return LogitsResult(out, options.labels, output.shape, vocab_size, tokens, seconds, done,
                        len(plan), row, appended)  # fmt: skip


def _check_paths(model_dir: Path, out: Path, options: LogitsOptions) -> None:
    if not (model_dir / "config.json").is_file():
        raise LogitsError(f"{model_dir} is not a saved Hugging Face model (no config.json); "
                          "give the folder of model.save_pretrained(...)")  # fmt: skip
    want = ".npy" if options.top_k is None else ".npz"
    if out.suffix != want:
        what = "full logits" if options.top_k is None else "top-k log-probabilities"
        raise LogitsError(f"--out {out}: {what} are written as {want}; name the file *{want}")
    if options.top_k is not None and options.top_k < 1:
        raise LogitsError(f"--top-k must be >= 1, got {options.top_k}")
    if options.manifest is not None and options.row is None:
        raise LogitsError("--manifest needs the model's row: give --role and --seed "
                          "(and --alpha, --temperature, --teacher-seed as they apply)")  # fmt: skip
    if options.labels is not None and options.labels.suffix != ".npy":
        raise LogitsError(f"--labels {options.labels}: labels are written as .npy")


def _tokenizer(model_dir: Path):
    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no tokenizer saved: only token ids (.npy) can be scored


def _model(model_dir: Path, device: torch.device):
    transformers = require_transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=_dtype(device), local_files_only=True
        )
    except (OSError, ValueError, KeyError) as err:
        raise LogitsError(f"{model_dir}: cannot load a causal language model "
                          f"({type(err).__name__}: {err})") from None  # fmt: skip
    return model.to(device).eval()


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LogitsError(f"--device {name}: no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LogitsError(f"--device {name!r}: give auto, cpu or cuda[:N]") from None


def _check_ids(ids: np.ndarray, vocab_size: int, corpus) -> None:
    if ids.shape[1] < 2:
        raise LogitsError(f"{corpus}: {ids.shape[1]} token(s); at least 2 are needed to score one")
    if ids.max() >= vocab_size:
        raise LogitsError(f"{corpus}: token id {int(ids.max())} is outside the model's "
                          f"vocabulary of {vocab_size}; tokenize with the model's tokenizer")  # fmt: skip


def _window(model, options: LogitsOptions) -> tuple[int, int]:
    limit = _max_positions(model.config)
    context = options.context or min(limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    if limit is not None and context > limit:
        raise LogitsError(f"--context {context} exceeds the model's {limit} positions; "
                          f"give --context {limit} or less")  # fmt: skip
    stride = options.stride or max(1, context // 2)
    if not 1 <= stride <= context:
        raise LogitsError(f"--stride must be between 1 and --context ({context}), got {stride}")
    return context, stride


def _max_positions(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_identity(mine, labels, model_dir: Path, options: LogitsOptions) -> None:
    if options.reference is not None:
        ident.check_reference(mine, options.reference, model_dir)
    if options.manifest is not None:
        ident.check_manifest(mine, options.manifest, labels, model_dir)


def _model_digest(model_dir: Path) -> str:
    """The model's files (names, sizes, mtimes) and config: a changed model is another run."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in model_dir.iterdir() if p.is_file())  # fmt: skip
    blob = repr((str(model_dir.resolve()), files)).encode()
    return hashlib.sha256(blob + (model_dir / "config.json").read_bytes()).hexdigest()


@torch.inference_mode()
def _run(model, ids: np.ndarray, plan: list[list[Window]], done: int, output: Output,
         top_k: int | None, device: torch.device, on_batch: BatchHook | None) -> int:  # fmt: skip
    tokens, committed = 0, time.monotonic()
    try:
        for i in range(done, len(plan)):
            batch = plan[i]
            x = torch.from_numpy(np.stack([ids[w.sequence, w.start : w.stop] for w in batch]))
            logits = model(input_ids=x.to(device), use_cache=False).logits  # (B, n, V)
            for w, z in zip(batch, logits, strict=True):
                rows = z[w.first - w.start : w.last - w.start].float()  # (m, V) kept positions
                output.write(w.sequence, w.first, _values(rows, top_k))
                tokens += w.last - w.first
            if time.monotonic() - committed >= COMMIT_SECONDS or i + 1 == len(plan):
                output.commit(i + 1)
                committed = time.monotonic()
            if on_batch is not None:
                on_batch(i + 1, len(plan), tokens)
    finally:
        output.close()
    return tokens


def _values(rows: torch.Tensor, top_k: int | None) -> dict[str, np.ndarray]:
    if top_k is None:
        return {"logits": rows.cpu().numpy()}
    logprobs, idx = torch.log_softmax(rows, dim=-1).topk(top_k, dim=-1)  # (m, k) descending
    return {"topk_ids": idx.cpu().numpy(), "topk_logprobs": logprobs.cpu().numpy()}


def _sidecar(model_dir: Path, corpus, mine, tokens: int, seconds: float, device) -> dict:
    from kdaudit import __version__

    return {
        "format": ident.FORMAT,
        "identity": mine.to_dict(),
        "model_dir": str(model_dir.resolve()),
        "corpus": str(Path(corpus).resolve()),
        "device": str(device),
        "tokens_scored_last_call": tokens,
        "seconds_last_call": seconds,
        "host": platform.node(),
        "torch": torch.__version__,
        "transformers": require_transformers().__version__,
        "kdaudit": __version__,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_labels(path: Path, labels: np.ndarray) -> None:
    if path.is_file():
        old = np.load(path, mmap_mode="r")
        if old.shape == labels.shape and np.array_equal(old, labels):
            return
        raise LogitsError(f"--labels {path} exists and holds other labels (shape {old.shape}); "
                          "delete it or choose another path")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, labels)
    tmp.replace(path)


def _row(options: LogitsOptions, out: Path, mine) -> tuple[str, bool]:
    if options.row is None:
        values = {"role": "ROLE", "seed": "SEED", "path": str(out.resolve())}
        return ident.csv_line(values), False
    if options.manifest is None:
        return ident.csv_line(options.row.values(str(out.resolve()))), False
    return ident.append_row(options.manifest, options.row, out, options.labels), True
