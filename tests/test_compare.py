"""`kdaudit compare`: manifest, file formats, checks, cache, and the CLI end to end."""

from __future__ import annotations

import json
import math
import os
import re
from itertools import product

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from kdaudit.cli import main
from kdaudit.compare import CompareError, compare, open_array, read_manifest
from kdaudit.compare import audit as audit_module
from kdaudit.metrics import accuracy_and_loss, functional_similarity

N, K = 48, 5
SEEDS = (10, 11, 12)
FORMATS = ("npy", "npz", "pt", "safetensors")
HEADER = "role,alpha,temperature,seed,teacher_seed,path"


# ----------------------------------------------------------------------------- fixtures


def save(path, array, key="logits"):
    """Write `array` in the format its suffix names."""
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, array)
    elif suffix == ".npz":
        np.savez(path, **{key: array})
    elif suffix == ".pt":
        torch.save(torch.from_numpy(array), path)
    elif suffix == ".safetensors":
        save_file({key: torch.from_numpy(array)}, str(path))
    return path.name


class Audit:
    """A folder of synthetic logits and its manifest: teacher seed 0, siddo/kd/rcd x SEEDS,
    the students' files cycling through every format."""

    def __init__(self, folder, shape=(N, K), seed=0):
        self.folder = folder
        rng = np.random.default_rng(seed)
        self.teacher = (rng.standard_normal(shape) * 2).astype(np.float32)
        right = self.teacher.argmax(axis=-1)
        wrong = rng.integers(0, K, right.shape)
        self.labels = np.where(rng.random(right.shape) < 0.7, right, wrong)
        save(folder / "labels.npy", self.labels)
        save(folder / "teacher.npy", self.teacher)
        self.rows = ["labels,,,,,labels.npy", "teacher,,,0,,teacher.npy"]
        self.students, self.files = {}, {}
        conditions = (("siddo", ",", 1.5), ("kd", "0.5,1", 0.5), ("rcd", "0.5,1", 1.4))
        for i, (student_seed, (role, setting, noise)) in enumerate(product(SEEDS, conditions)):
            array = (self.teacher + rng.standard_normal(shape) * noise).astype(np.float32)
            name = save(folder / f"{role}_{student_seed}.{FORMATS[i % len(FORMATS)]}", array)
            self.rows.append(f"{role},{setting},{student_seed},0,{name}")
            self.students[(role, student_seed)] = array
            self.files[(role, student_seed)] = name

    def manifest(self, rows=None, header=HEADER, name="manifest.csv"):
        path = self.folder / name
        path.write_text("\n".join([header, *(self.rows if rows is None else rows)]) + "\n")
        return path

    @property
    def next_line(self) -> int:
        """The manifest line of a row appended to `rows` (the header is line 1)."""
        return len(self.rows) + 2


@pytest.fixture
def audit(tmp_path):
    return Audit(tmp_path)


# ----------------------------------------------------------------------------- results


def test_every_format_gives_the_metrics_of_functional_similarity(audit, tmp_path):
    manifest = audit.manifest()
    assert {p.suffix for p in tmp_path.iterdir()} >= {".npy", ".npz", ".pt", ".safetensors"}
    result = compare(manifest, tmp_path / "out")
    for (role, seed), array in audit.students.items():
        expected = functional_similarity(audit.teacher, array, audit.labels)
        got = result.runs[(result.runs.condition == role) & (result.runs.student_seed == seed)]
        got = dict(zip(got.metric, got.value, strict=True))
        assert got.keys() == expected.keys()
        for metric, value in expected.items():
            assert got[metric] == pytest.approx(value, rel=1e-12, nan_ok=True), metric
    acc, loss = accuracy_and_loss(audit.teacher, audit.labels)
    teacher = result.teachers.iloc[0]
    assert (teacher.test_accuracy, teacher.test_loss) == (acc, pytest.approx(loss, rel=1e-12))
    assert math.isnan(teacher.train_accuracy) and math.isnan(teacher.train_loss)


def test_runs_frame_has_the_columns_and_settings_of_stored_runs(audit, tmp_path):
    result = compare(audit.manifest(), tmp_path / "out")
    assert list(result.runs.columns) == [
        "run_id", "teacher_seed", "student_seed", "condition", "alpha", "temperature",
        "width", "metric", "value",
    ]  # fmt: skip
    settings = result.runs.drop_duplicates("run_id").set_index("run_id")
    assert settings.loc["kd_a0.5_T1_t0_s10", ["alpha", "temperature"]].tolist() == [0.5, 1.0]
    assert settings.loc["siddo_t0_s10", ["alpha", "temperature"]].isna().all()
    assert len(result.verdicts) == 1 and result.verdicts.n.iloc[0] == len(SEEDS)
    assert result.notes == ()
    written = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert len(written) == len(result.runs)


def test_language_model_logits_count_every_position(tmp_path):
    audit = Audit(tmp_path, shape=(6, 8, K))
    result = compare(audit.manifest(), tmp_path / "out", chunk_size=5)
    kd = audit.students[("kd", 11)]
    flat = functional_similarity(audit.teacher.reshape(-1, K), kd.reshape(-1, K),
                                 audit.labels.reshape(-1), chunk_size=5)  # fmt: skip
    got = result.runs[result.runs.run_id == "kd_a0.5_T1_t0_s11"].set_index("metric").value
    assert got.to_dict() == pytest.approx(flat, rel=1e-12)
    assert got["n_teacher_correct"] + got["n_teacher_incorrect"] == 6 * 8


def test_non_finite_language_model_logits_give_the_position(tmp_path):
    audit = Audit(tmp_path, shape=(6, 8, K))
    bad = audit.students[("rcd", 12)].copy()
    bad[2, 3, 1] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    rows = [*audit.rows, "kd,0.9,1,12,0,bad.npy"]
    with pytest.raises(
        CompareError, match=r"bad.npy .*row is 19 .*index \(2, 3\) of shape \(6, 8\)"
    ):
        compare(audit.manifest(rows), tmp_path / "out")


def test_procrustes_above_its_class_limit_is_nan_with_a_note(audit, tmp_path):
    result = compare(audit.manifest(), tmp_path / "out", procrustes_max_classes=K - 1)
    procrustes = result.runs[result.runs.metric == "procrustes_distance"].value
    assert procrustes.isna().all()
    assert any("procrustes_max_classes=4" in note for note in result.notes)
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert "procrustes_max_classes=4" in summary["meta"]["notes"]


# ----------------------------------------------------------------------------- file formats


@pytest.mark.parametrize("suffix", FORMATS)
def test_open_array_reads_rows_and_whole_arrays(tmp_path, suffix):
    array = np.arange(7 * 3 * 4, dtype=np.float32).reshape(7, 3, 4)
    opened = open_array(tmp_path / save(tmp_path / f"a.{suffix}", array))
    assert opened.shape == (7, 3, 4) and opened.dtype == torch.float32
    assert torch.equal(opened.read(5, 9), torch.from_numpy(array.reshape(-1, 4)[5:9]))
    assert torch.equal(opened.read(19, 30), torch.from_numpy(array.reshape(-1, 4)[19:]))
    assert torch.equal(opened.load(), torch.from_numpy(array))
    opened.close()


def test_open_array_special_cases(tmp_path):
    array = np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32)
    expected = torch.from_numpy(array)
    # compressed npz: decompressed in order, and again from the start when rewound
    np.savez_compressed(tmp_path / "c.npz", other=array[:2], logits=array)
    opened = open_array(tmp_path / "c.npz")
    assert torch.equal(opened.read(6, 9), expected[6:]) and torch.equal(
        opened.read(0, 2), expected[:2]
    )
    # bfloat16 safetensors and big-endian npy
    save_file({"logits": expected.bfloat16()}, str(tmp_path / "b.safetensors"))
    assert torch.equal(open_array(tmp_path / "b.safetensors").read(2, 5), expected.bfloat16()[2:5])
    np.save(tmp_path / "be.npy", array.astype(">f4"))
    assert torch.equal(open_array(tmp_path / "be.npy").read(0, 9), expected)
    # .pt: a dict's `logits`, and a non-contiguous tensor (read through torch's own mmap)
    torch.save({"logits": expected, "labels": torch.arange(9)}, tmp_path / "d.pt")
    assert torch.equal(open_array(tmp_path / "d.pt").read(3, 4), expected[3:4])
    torch.save(expected.t().contiguous().t(), tmp_path / "t.pt")
    assert torch.equal(open_array(tmp_path / "t.pt").read(1, 8), expected[1:8])


def test_file_pages_are_released_after_each_block(tmp_path):
    array = np.ones((4096, 1024), dtype=np.float32)  # 16 MiB
    np.save(tmp_path / "big.npy", array)
    opened = open_array(tmp_path / "big.npy")
    for start in range(0, 4096, 256):
        opened.read(start, start + 256)
    mapped = _resident_kib(str(tmp_path / "big.npy"))
    opened.close()
    if mapped is None:
        pytest.skip("needs /proc/self/smaps")
    assert mapped < 2048  # at most about one block of 1 MiB stays mapped


def _resident_kib(path: str) -> int | None:
    """Resident KiB of this process's mappings of `path`, from /proc/self/smaps."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header line
            inside = line.endswith(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


# ----------------------------------------------------------------------------- errors


def error_cases(audit, tmp_path):
    """{expected message (regex): manifest rows}; the files they need are written here."""
    nan = audit.students[("kd", 11)].copy()
    nan[17, 2] = np.nan
    files = {
        "short.npy": audit.teacher[:-1],
        "wide.npy": np.zeros((N, K + 1), np.float32),
        "nan.npy": nan,
        "big_labels.npy": np.where(audit.labels == 0, K, audit.labels),
        "bad_labels.npy": audit.labels[:-2],
        "int.npy": np.zeros((N, K), np.int64),
    }
    for name, array in files.items():
        np.save(tmp_path / name, array)
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    (tmp_path / "x.h5").write_bytes(b"")
    np.savez(tmp_path / "two.npz", a=audit.teacher, b=audit.teacher)
    rows, line = audit.rows, audit.next_line

    def plus(row):
        return [*rows, row]

    def labels(name):
        return [f"labels,,,,,{name}", *rows[1:]]

    return {
        "N mismatch": (r"different numbers of examples \(N\)", plus("kd,0.9,1,10,0,short.npy")),
        "K mismatch": (r"different K \(classes/vocabulary: 5 vs 6\)", plus("kd,0.9,1,10,0,wide.npy")),
        "labels shape": (r"labels .*bad_labels.npy .* have shape \(46,\) but logits",
                         labels("bad_labels.npy")),
        "labels range": (r"labels .* hold class 5, outside the \[0, 5\) range of teacher "
                         r".*teacher.npy \(K=5", labels("big_labels.npy")),
        "no control": (r"teacher seed 0, kd alpha=0.5 T=1 \(student seeds 10, 11, 12\): no "
                       r"paired control", [r for r in rows if not r.startswith(("siddo", "rcd"))]),
        "duplicate": (rf"manifest lines 5 and {line} both describe kd_a0.5_T1_t0_s10",
                      plus(rows[3])),
        "nan student": (rf"nan.npy \(manifest line {line}, kd_a0.9_T1_t0_s10\): .*NaN or inf; the first bad row is 17",
                        plus("kd,0.9,1,10,0,nan.npy")),
        "nan teacher": (r"nan.npy \(manifest line 3, teacher_t0\): .*first bad row is 17 .*index \(17,\)",
                        [rows[0], "teacher,,,0,,nan.npy", *rows[2:]]),
        "integer logits": (r"logits have dtype torch.int64", plus("kd,0.9,1,10,0,int.npy")),
        "unknown role": (r"unknown role 'kdd'; roles are labels, teacher, disdo, fmkd, fmrc, kd, kd_confidence, kd_corrected, kd_masked, ls, rcd, siddo",
                         plus("kdd,0.5,1,13,0,teacher.npy")),
        "missing file": (rf"manifest line {line}: file not found: .*missing.npy",
                         plus("kd,0.5,1,13,0,missing.npy")),
        "corrupt file": (r"junk.npy: cannot read as .npy", plus("kd,0.5,1,13,0,junk.npy")),
        "unknown format": (r"x.h5: unknown format '.h5'", plus("kd,0.5,1,13,0,x.h5")),
        "ambiguous npz": (r"holds arrays \[a, b\]; name the one to use 'logits'",
                          plus("kd,0.5,1,13,0,two.npz")),
        "setting not taken": (r"siddo takes no alpha", plus("siddo,0.5,,13,0,teacher.npy")),
        "setting missing": (r"kd needs a value for alpha", plus("kd,,1,13,0,teacher.npy")),
        "unknown teacher": (r"teacher_seed 3 has no teacher row",
                            plus("kd,0.5,1,13,3,teacher.npy")),
        "no labels row": (r"no `labels` row", rows[1:]),
        "bad seed": (r"seed='x' is not an integer", plus("kd,0.5,1,x,0,teacher.npy")),
        "extra value": (r"more values than columns", plus("kd,0.5,1,13,0,teacher.npy,extra")),
    }  # fmt: skip


ERROR_CASES = (
    "N mismatch", "K mismatch", "labels shape", "labels range", "no control", "duplicate",
    "nan student", "nan teacher", "integer logits", "unknown role", "missing file",
    "corrupt file", "unknown format", "ambiguous npz", "setting not taken", "setting missing",
    "unknown teacher", "no labels row", "bad seed", "extra value",
)  # fmt: skip


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_manifests_and_files_raise_a_one_line_compare_error(audit, tmp_path, case):
    cases = error_cases(audit, tmp_path)
    assert set(cases) == set(ERROR_CASES)
    message, rows = cases[case]
    with pytest.raises(CompareError, match=message) as info:
        compare(audit.manifest(rows), tmp_path / "out")
    assert "\n" not in str(info.value)


def test_mismatch_errors_name_both_files(audit, tmp_path):
    np.save(tmp_path / "short.npy", audit.teacher[:-1])
    rows = [*audit.rows, "kd,0.9,1,10,0,short.npy"]
    with pytest.raises(CompareError, match=r"teacher\.npy .* has shape \(48, 5\) but .*short\.npy"):
        compare(audit.manifest(rows), tmp_path / "out")


def test_unknown_columns_are_errors(audit, tmp_path):
    with pytest.raises(CompareError, match=r"unknown columns \['weight'\]"):
        read_manifest(audit.manifest(header=HEADER + ",weight"))


def test_missing_rcd_is_a_warning_and_the_verdict_says_why(audit, tmp_path):
    rows = [r for r in audit.rows if not r.startswith("rcd")]
    result = compare(audit.manifest(rows), tmp_path / "out")
    assert any("no rcd rows" in note for note in result.notes)
    assert result.verdicts.verdict.tolist() == ["not_supported"]
    assert "no RCD" in result.verdicts.note.iloc[0]


def test_optional_columns_may_be_left_out(audit, tmp_path):
    rows = ["labels,,,labels.npy", "teacher,,0,teacher.npy"]
    rows += [f"{role},{'' if role == 'siddo' else 0.5},{seed},{name}"
             for (role, seed), name in audit.files.items()]  # fmt: skip
    manifest = read_manifest(audit.manifest(rows, header="role,alpha,seed,path"))
    assert manifest.labels == tmp_path / "labels.npy"
    assert {r.teacher_seed for r in manifest.students} == {0}
    kd = [r for r in manifest.students if r.role == "kd"]
    assert {(r.alpha, r.temperature) for r in kd} == {(0.5, 1.0)}  # empty T means 1


# ----------------------------------------------------------------------------- cache and CLI


def test_rerun_reads_the_cache_and_a_changed_file_is_recomputed(audit, tmp_path, monkeypatch):
    manifest, out = audit.manifest(), tmp_path / "out"
    first = compare(manifest, out)
    calls = []
    original = audit_module.functional_similarity_many

    def counting(teacher, models, labels, **kwargs):
        calls.append(len(models))
        return original(teacher, models, labels, **kwargs)

    monkeypatch.setattr(audit_module, "functional_similarity_many", counting)
    second = compare(manifest, out)
    assert calls == []
    pd.testing.assert_frame_equal(first.runs, second.runs)
    changed = tmp_path / "siddo_10.npy"
    np.save(changed, audit.students[("siddo", 10)] + 1.0)
    os.utime(changed, ns=(1, 1))  # a new mtime even on coarse-clock file systems
    compare(manifest, out)
    assert calls == [1]


def test_cli_writes_the_report_and_prints_the_verdicts(audit, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", str(audit.manifest()), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    # three paired seeds: no one-sided exact test can reach 0.05, so no verdict either way
    assert "KD alpha=0.5, T=1 (teacher seed 0): no verdict: too few paired seeds" in printed.out
    assert "  evidence: no verdict, too few paired seeds" in printed.out
    assert f"report: {out / 'report' / 'index.html'}" in printed.out
    assert "train accuracy" not in printed.out  # unknown from test logits
    assert "[1/10] teacher_t0" in printed.err
    for name in ("index.html", "summary.json", "report.md", "tables/verdicts.csv"):
        assert (out / "report" / name).is_file(), name
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["settings"][0]["n"] == len(SEEDS)
    assert (out / "manifest.resolved.csv").is_file() and (out / "metrics_cache.json").is_file()


def test_cli_prints_a_compare_error_on_one_line_with_exit_code_2(audit, tmp_path, capsys):
    rows = [*audit.rows, audit.rows[3]]
    assert main(["compare", str(audit.manifest(rows)), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdaudit: error: manifest lines") and err.count("\n") == 1


# ----------------------------------------------------------------------------- copied mistakes


def test_compare_writes_the_copied_mistakes_tables(audit, tmp_path):
    compare(audit.manifest(), tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "report" / "tables" / "copied_errors.csv")
    teacher = audit.teacher.reshape(-1, K).argmax(1)
    wrong = np.flatnonzero(teacher != audit.labels.reshape(-1))
    assert sorted(table.example) == sorted(wrong)  # every teacher mistake, once
    for role in ("kd", "siddo", "rcd"):  # the share of seeds that copied it, from numpy
        preds = np.stack([audit.students[(role, s)].reshape(-1, K).argmax(1) for s in SEEDS])
        expected = (preds[:, wrong] == teacher[wrong]).mean(axis=0)
        column = next(c for c in table.columns if c.startswith(role))
        got = table.set_index("example").loc[wrong, column].to_numpy()
        assert np.allclose(got, expected), role
    assert (tmp_path / "out" / "report" / "tables" / "copied_class_pairs.csv").is_file()
    md = (tmp_path / "out/report/report.md").read_text()
    assert "## Which mistakes were copied" in md
    # what was tested, as far as logits can tell: no claim about how the students were made
    assert "students trained outside kdaudit (their saved test logits are compared)" in md
    assert "self-distillation" not in md[: md.index("## Verdicts")]


def test_too_many_teacher_mistakes_leave_the_tables_out_with_a_note(audit, tmp_path, monkeypatch):
    monkeypatch.setattr("kdaudit.compare.copied.MAX_EXAMPLES", 3)
    result = compare(audit.manifest(), tmp_path / "out")
    assert any(n.startswith("copied-mistakes tables left out: teacher seed 0 has ")
               for n in result.notes)  # fmt: skip
    assert not (tmp_path / "out" / "report" / "tables" / "copied_errors.csv").exists()
