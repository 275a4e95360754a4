"""`kdaudit logits`: windows that score every position once, the scores against direct
forward passes, top-k files, resume after an interruption or a kill, the tokenizer checks
and the manifest row. Tiny random models built here (tests/hf_helpers.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kdaudit.api
from kdaudit.cli import main
from kdaudit.hf import LogitsError
from kdaudit.hf.identity import ManifestRow, append_row
from kdaudit.hf.score import LogitsOptions, score
from kdaudit.hf.windows import batches, windows
from tests.hf_helpers import TEXT, bpe_tokenizer, char_tokenizer, save_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hf")
    chars = char_tokenizer()
    return {
        "gpt2": save_model(tmp / "gpt2", chars, "gpt2", seed=0),
        "student": save_model(tmp / "student", chars, "gpt2", seed=1),
        "llama": save_model(tmp / "llama", chars, "llama", seed=0),
        "bpe": save_model(tmp / "bpe", bpe_tokenizer(), "gpt2", seed=2),
        "wide": save_model(tmp / "wide", chars, "gpt2", seed=3, vocab_size=80),
    }


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def _ids(model_dir: Path, text: str = TEXT) -> np.ndarray:
    from transformers import AutoTokenizer

    return np.asarray(AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)
                      ["input_ids"])  # fmt: skip


def _model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize("length", [2, 3, 17, 64, 65, 100, 257])
@pytest.mark.parametrize("context, stride", [(1, 1), (8, 8), (8, 3), (16, 1), (64, 32)])
def test_windows_score_every_position_with_a_next_token_exactly_once(length, context, stride):
    ws = list(windows(length, context, stride))
    kept = np.zeros(length - 1, dtype=int)
    for i, w in enumerate(ws):
        assert w.start == i * stride and w.stop - w.start <= context and w.stop <= length
        assert w.start <= w.first < w.last <= min(w.stop, length - 1)
        kept[w.first : w.last] += 1
        if i > 0:  # each later window sees at least context - stride tokens before its first
            assert w.first - w.start >= context - stride
        if i < len(ws) - 1:
            assert w.stop - w.start == context  # only the last window may be shorter
    assert (kept == 1).all()


def test_batches_group_windows_of_one_length_and_keep_their_order():
    plan = batches(3, 40, 16, 6, 4)
    flat = [w for b in plan for w in b]
    assert flat == [w for s in range(3) for w in windows(40, 16, 6, s)]
    for b in plan:
        assert len(b) <= 4 and len({w.length for w in b}) == 1


# ---------------------------------------------------------------- scores


def _expected_logits(model, ids: np.ndarray, context: int, stride: int) -> np.ndarray:
    """Independent of kdaudit.hf.windows: position p belongs to window w = the first whose
    inputs reach p, max(0, ceil((p + 1 - context) / stride)); a causal model's output at p in
    that window equals the last output of a forward over x[w * stride : p + 1]."""
    rows = []
    with torch.no_grad():
        for p in range(len(ids) - 1):
            w = max(0, -(-(p + 1 - context) // stride))
            x = torch.as_tensor(ids[w * stride : p + 1])[None]
            rows.append(model(input_ids=x).logits[0, -1].numpy())
    return np.stack(rows)[None]  # (1, P, V)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_windowed_logits_equal_direct_forward_passes(models, tmp_path, kind):
    corpus = tmp_path / "short.txt"
    corpus.write_text(TEXT[:103])
    ids = _ids(models[kind], TEXT[:103])
    assert len(ids) == 103  # 19 windows of 16 at stride 5, the last one shorter (13)
    options = LogitsOptions(labels=tmp_path / "labels.npy", context=16, stride=5, batch_size=3,
                            device="cpu")  # fmt: skip
    result = score(models[kind], corpus, tmp_path / "z.npy", options)
    got = np.load(tmp_path / "z.npy")
    assert got.shape == result.shape == (1, len(ids) - 1, result.vocab_size)
    np.testing.assert_allclose(got, _expected_logits(_model(models[kind]), ids, 16, 5),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), ids[None, 1:])
    assert result.tokens == len(ids) - 1


def test_one_window_over_the_corpus_equals_one_full_forward(models, corpus, tmp_path):
    ids = _ids(models["gpt2"])[:64]
    np.save(tmp_path / "ids.npy", ids)
    score(models["gpt2"], tmp_path / "ids.npy", tmp_path / "z.npy", LogitsOptions(context=64))
    with torch.no_grad():
        full = _model(models["gpt2"])(input_ids=torch.as_tensor(ids)[None]).logits[:, :-1]
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), full.numpy(), rtol=1e-5, atol=1e-5)


def test_topk_file_holds_the_top_k_log_probabilities_of_the_full_logits(models, corpus, tmp_path):
    full = tmp_path / "full.npy"
    score(models["gpt2"], corpus, full, LogitsOptions(context=32, stride=16))
    result = score(models["gpt2"], corpus, tmp_path / "top.npz",
                   LogitsOptions(top_k=5, context=32, stride=16))  # fmt: skip
    with np.load(tmp_path / "top.npz") as f:
        assert sorted(f.files) == ["topk_ids", "topk_logprobs", "vocab_size"]
        ids, logprobs, vocab = f["topk_ids"], f["topk_logprobs"], int(f["vocab_size"])
    z = torch.from_numpy(np.load(full)).double()
    expected = torch.log_softmax(z, dim=-1)
    assert vocab == z.shape[-1] and ids.shape == logprobs.shape == (*z.shape[:2], 5)
    assert result.shape == ids.shape and np.issubdtype(ids.dtype, np.integer)
    # the stored ids are the k largest, with their natural-log probabilities
    ranked = torch.argsort(expected, dim=-1, descending=True)[..., :5].numpy()
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(ranked, -1))
    np.testing.assert_allclose(logprobs, np.take_along_axis(expected.numpy(), ids, -1),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_jsonl_and_npy_corpora_give_the_txt_positions(models, corpus, tmp_path):
    half = len(TEXT) // 2
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": TEXT[:half]}) + "\n\n"
                                      + json.dumps({"text": TEXT[half:], "id": 2}) + "\n")  # fmt: skip
    joined = TEXT[:half] + "\n" + TEXT[half:]  # documents joined by a newline
    (tmp_path / "joined.txt").write_text(joined)
    np.save(tmp_path / "ids.npy", np.stack([_ids(models["gpt2"])[:50]] * 2))  # (2, 50)
    opts = LogitsOptions(context=16, stride=8)
    score(models["gpt2"], tmp_path / "c.jsonl", tmp_path / "a.npy", opts)
    score(models["gpt2"], tmp_path / "joined.txt", tmp_path / "b.npy", opts)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    score(models["gpt2"], tmp_path / "ids.npy", tmp_path / "n.npy", opts)
    two = np.load(tmp_path / "n.npy")
    assert two.shape[:2] == (2, 49)
    np.testing.assert_array_equal(two[0], two[1])  # no window crosses rows
    np.testing.assert_allclose(two[0], np.load(tmp_path / "b.npy")[0, :49], atol=1e-5)


# ---------------------------------------------------------------- resume


class _Interrupt(Exception):
    pass


def _stop_after(n: int):
    def hook(done, total, tokens):
        if done == n:
            raise _Interrupt

    return hook


@pytest.mark.parametrize("top_k", [None, 3])
def test_an_interrupted_run_resumes_to_the_same_bytes(models, corpus, tmp_path, top_k, monkeypatch):
    monkeypatch.setattr("kdaudit.hf.score.COMMIT_SECONDS", 0.0)  # every batch committed
    suffix = ".npy" if top_k is None else ".npz"
    opts = LogitsOptions(top_k=top_k, context=16, stride=4, batch_size=2)
    clean = tmp_path / f"clean{suffix}"
    score(models["gpt2"], corpus, clean, opts)
    out = tmp_path / f"cut{suffix}"
    with pytest.raises(_Interrupt):
        score(models["gpt2"], corpus, out, opts, on_batch=_stop_after(3))
    assert not out.exists() and (tmp_path / f"cut{suffix}.partial" / "progress.json").is_file()
    seen = []
    result = score(models["gpt2"], corpus, out, opts, on_batch=lambda d, t, n: seen.append(d))
    assert result.resumed_at == 3 and seen[0] == 4  # continued at the next batch
    assert out.read_bytes() == clean.read_bytes()
    assert not (tmp_path / f"cut{suffix}.partial").exists()
    again = score(models["gpt2"], corpus, out, opts)  # complete: nothing to do
    assert again.tokens == 0 and out.read_bytes() == clean.read_bytes()


def test_a_partial_run_with_other_settings_is_refused(models, corpus, tmp_path):
    out = tmp_path / "z.npy"
    with pytest.raises(_Interrupt):  # stopped before its first commit: progress 0
        score(models["gpt2"], corpus, out, LogitsOptions(context=16, stride=4),
              on_batch=_stop_after(1))  # fmt: skip
    with pytest.raises(LogitsError, match=r"other settings \(stride differ"):
        score(models["gpt2"], corpus, out, LogitsOptions(context=16, stride=8))


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_file(models, tmp_path):
    corpus = tmp_path / "long.txt"
    corpus.write_text(TEXT * 10)
    args = ["logits", str(models["gpt2"]), str(corpus), "--top-k", "4", "--context", "32", "--stride", "8",
            "--batch-size", "1", "--device", "cpu"]  # fmt: skip
    main([*args, "--out", str(tmp_path / "clean.npz")])
    out = tmp_path / "killed.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The whole corpus takes well under a second on a fast machine, shorter than one commit
    # interval: the killed process commits after every batch and is slowed to ~20 ms a batch
    # (about 6 s in all), so the kill lands mid-way on any machine.
    driver = (
        "import sys, time; import kdaudit.hf.score as s; from kdaudit.cli import main\n"
        "s.COMMIT_SECONDS = 0.0\n"
        "values = s._values\n"
        "s._values = lambda *a: (time.sleep(0.02), values(*a))[1]\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver, *args, "--out", str(out)],
                            env=env, stderr=subprocess.DEVNULL)  # fmt: skip
    progress = tmp_path / "killed.npz.partial" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.is_file() and json.loads(progress.read_text())["batches"] >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["batches"]
    assert not out.exists() and done >= 1  # killed mid-way
    assert main([*args, "--out", str(out)]) == 0
    assert out.read_bytes() == (tmp_path / "clean.npz").read_bytes()


# ---------------------------------------------------------------- one tokenizer


def test_a_student_with_another_tokenizer_is_refused(models, corpus, tmp_path):
    teacher = tmp_path / "teacher.npz"
    score(models["gpt2"], corpus, teacher, LogitsOptions(top_k=3, context=32))
    same = LogitsOptions(top_k=3, context=32, reference=teacher)
    score(models["student"], corpus, tmp_path / "s.npz", same)  # same tokenizer: accepted
    with pytest.raises(LogitsError, match="tokenizer differs"):
        score(models["bpe"], corpus, tmp_path / "bpe.npz", same)
    with pytest.raises(LogitsError, match="80 logits per position"):
        score(models["wide"], corpus, tmp_path / "wide.npz", same)
    other = tmp_path / "other.txt"
    other.write_text(TEXT[::-1])
    with pytest.raises(LogitsError, match="other ids"):
        score(models["student"], other, tmp_path / "o.npz", same)
    assert not (tmp_path / "bpe.npz").exists() and not (tmp_path / "bpe.npz.partial").exists()


def test_manifest_rows_are_appended_once_checked_and_read_by_compare(models, corpus, tmp_path):
    from kdaudit.compare.manifest import read_manifest

    manifest = tmp_path / "audit" / "manifest.csv"
    opts = dict(context=32, stride=16, manifest=manifest, labels=tmp_path / "audit" / "y.npy")
    rows = [("teacher", 0, None, "gpt2"), ("kd", 10, 0.5, "student"), ("siddo", 10, None, "llama")]
    for role, seed, alpha, model in rows:
        row = ManifestRow(role, seed, alpha)
        result = score(models[model], corpus, tmp_path / "audit" / f"{role}.npy",
                       LogitsOptions(row=row, **opts))  # fmt: skip
        assert result.appended
    score(models["student"], corpus, tmp_path / "audit" / "kd.npy",
          LogitsOptions(row=ManifestRow("kd", 10, 0.5), **opts))  # a rerun: no second row  # fmt: skip
    lines = manifest.read_text().splitlines()
    assert lines == ["role,alpha,temperature,seed,teacher_seed,path", "labels,,,,,y.npy",
                     "teacher,,,0,0,teacher.npy", "kd,0.5,,10,0,kd.npy",
                     "siddo,,,10,0,siddo.npy"]  # fmt: skip
    parsed = read_manifest(manifest)
    assert [r.label for r in parsed.students] == ["kd_a0.5_T1_t0_s10", "siddo_t0_s10"]
    result = kdaudit.api.compare(manifest, tmp_path / "compared")  # the files are readable
    accuracy = result.runs[(result.runs.metric == "accuracy") & (result.runs.condition == "kd")]
    labels, kd = np.load(tmp_path / "audit" / "y.npy"), np.load(tmp_path / "audit" / "kd.npy")
    assert accuracy.value.item() == pytest.approx((kd.argmax(-1) == labels).mean(), abs=1e-12)
    with pytest.raises(LogitsError, match="tokenizer differs"):
        score(models["bpe"], corpus, tmp_path / "audit" / "rcd.npy",
              LogitsOptions(row=ManifestRow("rcd", 10, 0.5), **opts))  # fmt: skip
    with pytest.raises(LogitsError, match="already lists kd seed 10"):
        score(models["llama"], corpus, tmp_path / "audit" / "kd2.npy",
              LogitsOptions(row=ManifestRow("kd", 10, 0.5), **opts))  # fmt: skip


def test_a_row_is_appended_on_its_own_line_to_a_hand_written_manifest(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("role,seed,path\nteacher,0,t.npy")  # no newline at the end
    line = append_row(manifest, ManifestRow("siddo", 10), tmp_path / "s.npy", None)
    assert line == "siddo,10,s.npy"
    assert manifest.read_text().splitlines() == ["role,seed,path", "teacher,0,t.npy", line]
    with pytest.raises(LogitsError, match="no column 'alpha'"):
        append_row(manifest, ManifestRow("kd", 10, 0.5), tmp_path / "k.npy", None)


# ---------------------------------------------------------------- errors and the CLI


def test_cli_prints_the_row_and_throughput(models, corpus, tmp_path, capsys):
    out = tmp_path / "t.npz"
    code = main(["logits", str(models["gpt2"]), str(corpus), "--out", str(out), "--top-k", "2",
                 "--context", "32", "--role", "kd", "--seed", "11", "--alpha", "0.9"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "tokens/s" in printed
    assert f"manifest row: kd,0.9,,11,0,{out.resolve()}" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "x.npz"], "full logits are written as .npy"),
        (["--out", "x.npy", "--top-k", "2"], "written as .npz"),
        (["--out", "x.npy", "--context", "65"], "exceeds the model's 64 positions"),
        (["--out", "x.npy", "--stride", "40", "--context", "32"], "--stride must be between"),
        (["--out", "x.npy", "--role", "kd", "--seed", "1"], "--role kd needs --alpha"),
        (["--out", "x.npy", "--role", "boss", "--seed", "1"], "'boss' is not a role"),
        (["--out", "x.npy", "--manifest", "m.csv"], "--manifest needs the model's row"),
        (["--out", "x.npz", "--top-k", "999"], "exceeds the vocabulary"),
    ],
)
def test_bad_options_are_one_line_errors(models, corpus, tmp_path, capsys, argv, message):
    argv = [a if not a.startswith("x.") and a != "m.csv" else str(tmp_path / a) for a in argv]
    assert main(["logits", str(models["gpt2"]), str(corpus), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_folder_without_a_model_and_a_missing_corpus_are_named(models, corpus, tmp_path):
    with pytest.raises(LogitsError, match="not a saved Hugging Face model"):
        score(tmp_path, corpus, tmp_path / "z.npy")
    with pytest.raises(LogitsError, match="corpus not found"):
        score(models["gpt2"], tmp_path / "none.txt", tmp_path / "z.npy")
    np.save(tmp_path / "big.npy", np.array([1, 2, 500]))
    with pytest.raises(LogitsError, match="token id 500 is outside"):
        score(models["gpt2"], tmp_path / "big.npy", tmp_path / "z.npy")


def test_without_transformers_the_error_names_the_extra(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LogitsError, match=r"pip install 'kdaudit\[hf\]'"):
        score(tmp_path, corpus, tmp_path / "z.npy")


def test_logits_help_loads_neither_torch_nor_transformers():
    code = ("import sys; from kdaudit.cli import main\n"
            "try: main(['logits', '--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_top_k_files_of_kdaudit_logits_are_read_by_compare(models, corpus, tmp_path):
    """The two halves of issue 17 meet: top-k .npz files written by `kdaudit logits` (int32
    ids) audited by `kdaudit compare`, whose exact top-1 metrics equal the full-logit run's."""
    results = {}
    for k in (None, 5):
        folder = tmp_path / f"k{k}"
        manifest = folder / "manifest.csv"
        opts = dict(context=32, stride=16, manifest=manifest, labels=folder / "y.npy", top_k=k)
        for role, seed, alpha, model in [("teacher", 0, None, "gpt2"), ("kd", 10, 0.5, "student"),
                                         ("siddo", 10, None, "llama")]:  # fmt: skip
            out = folder / f"{role}.{'npy' if k is None else 'npz'}"
            score(models[model], corpus, out,
                  LogitsOptions(row=ManifestRow(role, seed, alpha), **opts))  # fmt: skip
        results[k] = kdaudit.api.compare(manifest, folder / "compared").runs
    exact = ["accuracy", "prediction_disagreement", "correct_agreement", "incorrect_agreement"]
    for name in exact:
        full = results[None][results[None].metric == name].sort_values("condition").value
        top = results[5][results[5].metric == name].sort_values("condition").value
        np.testing.assert_allclose(
            top.to_numpy(), full.to_numpy(), rtol=0, atol=1e-12, err_msg=name
        )
