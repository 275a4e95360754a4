"""`kdaudit compare` on top-k files (topk_ids, topk_logprobs, vocab_size): k = V equals the
full-logit audit, mixed manifests, what the result says is approximate, and bad files."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.special import log_softmax

from kdaudit.cli import main
from kdaudit.compare import CompareError, TopkFile, compare, open_logits
from kdaudit.metrics import TopK, accuracy_and_loss, functional_similarity
from tests.test_compare import Audit, K

TOPK_FORMATS = ("npz", "safetensors")


def save_topk(path, logits, k, dtype=np.float64, ids_dtype=np.int32, **extra):
    """The top-k file of `logits` (..., V): ids shuffled within each row, natural-log probs."""
    z = np.asarray(logits, dtype=np.float64)
    v = z.shape[-1]
    flat = z.reshape(-1, v)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    ids = np.random.default_rng(k).permuted(order, axis=1)
    log_p = np.take_along_axis(log_softmax(flat, axis=1), ids, axis=1)
    arrays = {
        "topk_ids": ids.reshape(*z.shape[:-1], k).astype(ids_dtype),
        "topk_logprobs": log_p.reshape(*z.shape[:-1], k).astype(dtype),
        "vocab_size": np.array(v),
        **extra,
    }
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        save_file({key: torch.from_numpy(np.array(a, order="C")) for key, a in arrays.items()},
                  str(path))  # fmt: skip
    return path.name


def topk_rows(audit, folder, k, teacher_too=True, dtype=np.float64):
    """The audit's manifest rows with every student (and the teacher) as a top-k file."""
    rows = []
    for line in audit.rows:
        role, *settings, name = line.split(",")
        if role == "labels" or (role == "teacher" and not teacher_too):
            rows.append(line)
            continue
        array = audit.teacher if role == "teacher" else audit.students[(role, int(settings[2]))]
        suffix = TOPK_FORMATS[len(rows) % 2]
        new = save_topk(folder / f"{name.split('.')[0]}_top{k}.{suffix}", array, k, dtype)
        rows.append(",".join([role, *settings, new]))
    return rows


def load_topk(folder, stem) -> TopK:
    """A top-k file written by save_topk, whichever format it got, read without kdaudit."""
    if (folder / f"{stem}.npz").is_file():
        arrays = dict(np.load(folder / f"{stem}.npz"))
    else:
        arrays = {k: v.numpy() for k, v in load_file(str(folder / f"{stem}.safetensors")).items()}
    return TopK(arrays["topk_ids"], arrays["topk_logprobs"], int(arrays["vocab_size"]))


def metrics_by_run(result) -> pd.DataFrame:
    return result.runs.pivot(index="run_id", columns="metric", values="value")


@pytest.mark.parametrize("shape", [(48, K), (6, 8, K)])
def test_k_equal_v_gives_the_full_logit_audit(tmp_path, shape):
    audit = Audit(tmp_path, shape=shape)
    full = compare(audit.manifest(), tmp_path / "full", chunk_size=7)
    manifest = audit.manifest(topk_rows(audit, tmp_path, K), name="topk.csv")
    topk = compare(manifest, tmp_path / "topk", chunk_size=7)
    a, b = metrics_by_run(full), metrics_by_run(topk)
    assert list(b.columns) == sorted([*a.columns, "n_label_outside_topk", "topk_overlap"])
    assert (b.topk_overlap == 1).all() and (b.n_label_outside_topk == 0).all()
    for metric in a.columns:
        assert np.allclose(b[metric], a[metric], rtol=1e-9, atol=1e-12, equal_nan=True), metric
    pd.testing.assert_frame_equal(full.teachers, topk.teachers, rtol=1e-12)
    columns = ["verdict", "asymmetry", "n_significant"]
    columns = [c for c in columns if c in full.verdicts.columns]
    pd.testing.assert_frame_equal(full.verdicts[columns], topk.verdicts[columns])
    assert full.verdict_lines() == topk.verdict_lines()
    md = (tmp_path / "topk" / "report" / "report.md").read_text()
    assert "top-k approx.: none" in md and md.count("(top-k approx.)") == 0


def test_top_k_students_of_a_full_logit_teacher(tmp_path):
    audit = Audit(tmp_path)
    rows = topk_rows(audit, tmp_path, 3, teacher_too=False, dtype=np.float32)
    result = compare(audit.manifest(rows, name="mixed.csv"), tmp_path / "out")
    expected = functional_similarity(audit.teacher, load_topk(tmp_path, "kd_10_top3"), audit.labels)
    got = metrics_by_run(result).loc["kd_a0.5_T1_t0_s10"]
    assert got.to_dict() == pytest.approx(expected, rel=1e-12, nan_ok=True)
    # the teacher's own accuracy and loss come from its full logits: exact
    acc, loss = accuracy_and_loss(audit.teacher, audit.labels)
    teacher = result.teachers.iloc[0]
    assert (teacher.test_accuracy, teacher.test_loss) == (acc, pytest.approx(loss, rel=1e-12))
    # the result says which view and which metrics are approximate
    assert "top-3 view of each file (V=5; 9 top-k file(s), 1 full-logit file(s)" in result.notes[0]
    marked = "activation_distance, js_divergence, procrustes_distance, loss"
    assert result.notes[1].startswith(f"top-k approx.: {marked} (")
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert summary["meta"]["top-k approx."] == marked
    assert summary["meta"]["top-k"] == "k=3 of V=5 (9 top-k file(s))"
    # every table row naming an approximate metric carries the mark; exact metrics do not
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| activation distance ↓ (top-k approx.) |" in md
    assert "| js divergence ↓ (top-k approx.) |" in md
    assert "| prediction disagreement ↓ |" in md and "| rank disagreement ↓ |" in md
    assert "prediction disagreement (top-k approx.)" not in md


def test_files_of_several_k_are_compared_at_the_smallest(tmp_path):
    audit = Audit(tmp_path)
    rows = topk_rows(audit, tmp_path, 4)
    rows[-1] = rows[-1].replace("_top4.", "_top2.")
    role, *_, name = rows[-1].split(",")
    seed = int(rows[-1].split(",")[3])
    save_topk(tmp_path / name, audit.students[(role, seed)], 2)
    result = compare(audit.manifest(rows, name="ks.csv"), tmp_path / "out")
    assert "top-2 view" in result.notes[0]
    teacher, kd = load_topk(tmp_path, "teacher_top4"), load_topk(tmp_path, "kd_10_top4")
    expected = functional_similarity(teacher, kd, audit.labels, topk=2)
    got = metrics_by_run(result).loc["kd_a0.5_T1_t0_s10"]
    assert got.to_dict() == pytest.approx(expected, rel=1e-12, nan_ok=True)


def test_the_cache_knows_the_view(tmp_path):
    audit = Audit(tmp_path)
    rows = topk_rows(audit, tmp_path, 3, teacher_too=False)
    lines = []
    compare(audit.manifest(rows, name="a.csv"), tmp_path / "out", log=lines.append)
    lines.clear()
    compare(audit.manifest(rows, name="a.csv"), tmp_path / "out", log=lines.append)
    assert "10 of 10 models' metrics read from the cache" in lines
    # the same full-logit teacher, now cut to k = 2: its students' metrics are recomputed
    rows2 = topk_rows(audit, tmp_path, 2, teacher_too=False)
    lines.clear()
    compare(audit.manifest(rows2, name="b.csv"), tmp_path / "out", log=lines.append)
    assert "1 of 10 models' metrics read from the cache" in lines


def test_open_logits_reads_both_kinds(tmp_path):
    z = np.random.default_rng(0).standard_normal((7, 3, 6)).astype(np.float32)
    for suffix in TOPK_FORMATS:
        opened = open_logits(tmp_path / save_topk(tmp_path / f"t.{suffix}", z, 4))
        assert isinstance(opened, TopkFile)
        assert (opened.shape, opened.k, opened.vocab_size) == ((7, 3, 4), 4, 6)
        assert opened.ids.read(2, 5).shape == (3, 4) and opened.ids.dtype == torch.int32
        opened.close()
    np.savez(tmp_path / "plain.npz", logits=z)
    assert not isinstance(open_logits(tmp_path / "plain.npz"), TopkFile)


def error_cases(audit, folder):
    """Case -> (the message it must give, the kd row's file)."""
    kd = audit.students[("kd", 10)]
    z = np.asarray(kd, dtype=np.float64)
    ids = np.argsort(-z, axis=1)[:, :3]
    log_p = np.take_along_axis(log_softmax(z, axis=1), ids, axis=1)
    np.savez(folder / "no_vocab.npz", topk_ids=ids, topk_logprobs=log_p)
    np.savez(folder / "big_k.npz", topk_ids=ids, topk_logprobs=log_p, vocab_size=2)
    np.savez(folder / "vocab6.npz", topk_ids=ids, topk_logprobs=log_p, vocab_size=6)
    np.savez(folder / "float_ids.npz", topk_ids=ids * 1.0, topk_logprobs=log_p, vocab_size=K)
    np.savez(folder / "vector_vocab.npz", topk_ids=ids, topk_logprobs=log_p, vocab_size=[5, 5])
    np.savez(folder / "short.npz", topk_ids=ids[:, :2], topk_logprobs=log_p, vocab_size=K)
    bad_row = log_p.copy()
    bad_row[17] = np.log([0.9, 0.5, 0.1])
    np.savez(folder / "mass.npz", topk_ids=ids, topk_logprobs=bad_row, vocab_size=K)
    repeated = ids.copy()
    repeated[30, 1] = repeated[30, 0]
    np.savez(folder / "repeat.npz", topk_ids=repeated, topk_logprobs=log_p, vocab_size=K)
    return {
        "no_vocab.npz": "holds topk_ids but not vocab_size; a top-k file needs topk_ids, "
        "topk_logprobs, vocab_size",
        "big_k.npz": "k=3 ids per position but vocab_size is 2",
        "vocab6.npz": r"different K \(classes/vocabulary: 5 vs 6\)",
        "float_ids.npz": "topk_ids have dtype torch.float64",
        "vector_vocab.npz": r"vocab_size must be one integer >= 2 .*got \[5, 5\]",
        "short.npz": r"topk_ids have shape \(48, 2\) and topk_logprobs \(48, 3\)",
        "mass.npz": r"mass.npz \(manifest line \d+, kd_a0.9_T1_t0_s10\): topk_logprobs sum to "
        r"a probability above 1 .*the first bad row is 17 ",
        "repeat.npz": "topk_ids repeat a class within a row; the first bad row is 30 ",
    }


ERROR_FILES = ["no_vocab.npz", "big_k.npz", "vocab6.npz", "float_ids.npz", "vector_vocab.npz",
               "short.npz", "mass.npz", "repeat.npz"]  # fmt: skip


@pytest.mark.parametrize("name", ERROR_FILES)
def test_bad_top_k_files_give_one_line_errors(tmp_path, name, capsys):
    audit = Audit(tmp_path)
    cases = error_cases(audit, tmp_path)
    assert set(cases) == set(ERROR_FILES)
    manifest = audit.manifest([*audit.rows, f"kd,0.9,1,10,0,{name}"])
    with pytest.raises(CompareError, match=cases[name]) as info:
        compare(manifest, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert main(["compare", str(manifest), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert re.search(cases[name], err)
