"""Progress for a log file: one plain line per finished run (count, the run's time, ETA),
one line for all the students a failed teacher blocked, nothing wrapped."""

from __future__ import annotations

import io
from types import SimpleNamespace

from kdaudit.cli import main
from kdaudit.executors.progress import LogReporter, RichReporter, blocked_message, default_reporter


def _spec(label: str, teacher_id: str | None = "teacher_t0-abc"):
    is_teacher = teacher_id is None
    return SimpleNamespace(label=label, run_id=f"{label}-id", is_teacher=is_teacher,
                           teacher_id=teacher_id)  # fmt: skip


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_run_with_count_time_and_eta():
    stream, clock = io.StringIO(), Clock()
    reporter = LogReporter(stream, clock)
    reporter.start_grid(total=5, done=1, todo=4)
    for i, seconds in enumerate([10.0, 20.0]):
        spec = _spec(f"kd_s{i}")
        reporter.start_run(spec, steps=100)
        clock.now += seconds
        reporter.end_run(spec, "complete")
    reporter.end_grid()
    assert stream.getvalue().splitlines() == [
        "grid: 5 runs, 1 already complete, 4 to run",
        "[1/4, eta 30.0 s] kd_s0 (10.0 s): complete",
        "[2/4, eta 30.0 s] kd_s1 (20.0 s): complete",
    ]


def test_a_failed_teacher_blocks_its_students_in_one_line():
    stream = io.StringIO()
    reporter = LogReporter(stream, Clock())
    reporter.start_grid(total=4, done=0, todo=4)
    teacher = _spec("teacher_t0", teacher_id=None)
    reporter.end_run(teacher, "failed: NonFiniteLoss: the loss became NaN")
    for i in range(3):
        student = _spec(f"kd_s{i}")
        reporter.end_run(student, blocked_message(student))
    reporter.end_grid()
    lines = stream.getvalue().splitlines()
    assert lines[1] == "[1/4, eta 0.0 s] teacher_t0: failed: NonFiniteLoss: the loss became NaN"
    assert len(lines) == 3
    assert lines[2].startswith("3 student run(s) skipped: their teacher teacher_t0-abc did not")


def test_the_rich_display_also_says_it_once():
    stream = io.StringIO()
    from rich.console import Console

    reporter = RichReporter(Console(file=stream, width=300))
    reporter.start_grid(total=3, done=0, todo=3)
    for i in range(3):
        student = _spec(f"kd_s{i}")
        reporter.end_run(student, blocked_message(student))
    reporter.end_grid()
    assert stream.getvalue().count("skipped") == 1


def test_a_terminal_gets_bars_and_a_file_lines():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(default_reporter(Tty()), RichReporter)
    assert isinstance(default_reporter(io.StringIO()), LogReporter)


def test_the_cli_logs_plain_lines_when_not_a_terminal(tiny_config, tmp_path, capsys):
    args = ["run", str(tiny_config), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--workers", "1", "--set", "train.lr=1e30"]  # fmt: skip
    assert main(args) == 1  # the teacher's loss is not finite: it fails, its students wait
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == "grid: 7 runs, 0 already complete, 7 to run"
    assert err[1].startswith("[1/7, eta ") and "teacher_t0" in err[1] and "NonFiniteLoss" in err[1]
    assert len(err) == 3 and err[2].startswith("6 student run(s) skipped")
    assert not any(c in captured.err for c in "━\r\x1b")  # no bars, no cursor movement
    assert "1 failed, 6 blocked" in captured.out


def test_verdict_sentences_are_not_wrapped(tiny_config, tmp_path, capsys):
    args = ["run", str(tiny_config), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--workers", "1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    verdicts = [line for line in out if line.startswith("KD alpha=")]
    assert len(verdicts) == 1 and len(verdicts[0]) > 100  # one line, however long
    evidence = out[out.index(verdicts[0]) + 1]
    assert evidence.startswith("  evidence: ") and len(evidence) > 120  # one line too
    assert out[out.index(verdicts[0]) + 2] == ""  # and nothing continues it
