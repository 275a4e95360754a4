"""Throughput of `kdaudit logits` on this machine: a randomly initialised GPT-2 (character
vocabulary of TinyShakespeare, built here, nothing downloaded) scoring the test text.

    python benchmarks/logits_throughput.py --data-dir ../shared/data [--tokens 20000]
        [--layers 2] [--embd 64] [--context 256] [--stride 128] [--batch-size 8]
        [--top-k 20] [--threads 1] [--device cpu]

Builds the model in a temporary folder, runs the command in this process (the model load
included in the wall time, transformers' import not) and prints the command, the positions
scored per second of scoring, and the load average before and after. Random weights cost
what trained ones cost.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embd", type=int, default=64)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from kdaudit.cli import main as kdaudit

    text = (args.data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp / "model")
        config = GPT2Config(vocab_size=len(vocab), n_layer=args.layers, n_embd=args.embd,
                            n_head=4, n_positions=args.context, bos_token_id=None,
                            eos_token_id=None)  # fmt: skip
        GPT2LMHeadModel(config).save_pretrained(tmp / "model")
        corpus = tmp / "test.txt"
        corpus.write_text(text[int(0.9 * len(text)) :][: args.tokens + 1], encoding="utf-8")
        argv = ["logits", str(tmp / "model"), str(corpus), "--out", str(tmp / "out.npz"),
                "--context", str(args.context), "--stride", str(args.stride),
                "--batch-size", str(args.batch_size), "--device", args.device,
                "--threads", str(args.threads)]  # fmt: skip
        if args.top_k:
            argv += ["--top-k", str(args.top_k)]
        else:
            argv[4] = str(tmp / "out.npy")
        print(f"load average before: {os.getloadavg()}")
        print(f"model: GPT-2, {args.layers} layers, embedding {args.embd}, vocabulary "
              f"{len(vocab)}; torch threads {args.threads}")  # fmt: skip
        print("command: kdaudit " + " ".join(argv))
        start = time.perf_counter()
        kdaudit(argv)
        print(f"wall time (model load included): {time.perf_counter() - start:.1f} s")
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
