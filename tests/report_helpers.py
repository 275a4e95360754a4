"""Helpers for test_report.py: a synthetic run table, and headless Chromium over CDP.

Chromium is driven through the DevTools protocol on a pipe (--remote-debugging-pipe:
the browser reads commands on fd 3 and writes replies on fd 4, NUL-separated JSON), so
the page itself needs no script to be checked: images, console errors and the
screenshot all come from the browser.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import math
import os
import select
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kdaudit.metrics import BETTER, FUNCTIONAL_METRICS

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")

# ----------------------------------------------------------------------------- data

BASE = dict(
    activation_distance=0.20,
    js_divergence=0.04,
    rank_disagreement=0.55,
    prediction_disagreement=0.12,
    prediction_agreement=0.88,
    correct_agreement=0.93,
    incorrect_agreement=0.35,
    variation_of_information=0.45,
    procrustes_distance=0.25,
    accuracy=0.90,
    loss=0.35,
)


def synthetic_runs(teacher_seeds=(0,), student_seeds=range(10, 20), alphas=(0.1, 0.9)):
    """SIDDO, and KD / RCD / LS per alpha at T=1; KD clearly better only at alpha >= 0.5."""
    rng = np.random.default_rng(0)
    rows = []
    for t in teacher_seeds:
        for s in student_seeds:
            rows += _run_rows(rng, t, s, "siddo", math.nan, math.nan, gain=0.0)
            for a in alphas:
                strong = a >= 0.5
                rows += _run_rows(rng, t, s, "kd", a, 1.0, gain=0.3 if strong else 0.0)
                rows += _run_rows(rng, t, s, "rcd", a, 1.0, gain=0.0)
                rows += _run_rows(rng, t, s, "ls", a, math.nan, gain=0.0)
    return pd.DataFrame(rows)


def _run_rows(rng, teacher_seed, student_seed, condition, alpha, temperature, gain):
    run_id = f"t{teacher_seed}-{condition}-a{alpha:g}-T{temperature:g}-s{student_seed}"
    keys = dict(
        run_id=run_id,
        teacher_seed=teacher_seed,
        student_seed=student_seed,
        condition=condition,
        alpha=alpha,
        temperature=temperature,
    )
    values = {}
    for metric, base in BASE.items():
        sign = -1.0 if BETTER[metric] == "lower" else 1.0
        relative = gain if metric in FUNCTIONAL_METRICS else gain / 10
        values[metric] = base * (1 + sign * relative) + rng.normal(0, 0.004)
    if gain:  # negative asymmetric transfer: mistakes copied more than correct behaviour
        values["correct_agreement"] = BASE["correct_agreement"] + 0.01 + rng.normal(0, 0.003)
        values["incorrect_agreement"] = BASE["incorrect_agreement"] + 0.09 + rng.normal(0, 0.01)
    values.update(n_teacher_correct=9518.0, n_teacher_incorrect=482.0)
    return [dict(keys, metric=m, value=float(v)) for m, v in values.items()]


def synthetic_teachers(teacher_seeds=(0,)):
    return pd.DataFrame(
        dict(
            teacher_seed=list(teacher_seeds),
            train_loss=[0.000646 * (1 + 0.1 * t) for t in teacher_seeds],
            train_accuracy=[0.9999] * len(teacher_seeds),
            test_loss=[0.2811] * len(teacher_seeds),
            test_accuracy=[0.9518] * len(teacher_seeds),
            n_params=[11_173_962] * len(teacher_seeds),
        )
    )


# ----------------------------------------------------------------------------- browser


def find_chromium() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


@dataclass
class PageCheck:
    images: list[dict]  # {"src": prefix, "complete": bool, "width": int}
    errors: list[str]  # console errors, uncaught exceptions, failed loads
    resources: list[str]  # URLs fetched by the page other than data: URIs
    first_section: str
    first_verdict_top: float  # px from the top of a 900 px high window; -1: no verdict
    text: str = field(repr=False, default="")


class _Browser:
    """A Chromium process and the CDP pipe to it."""

    def __init__(self, executable: str, profile: Path, log: Path):
        to_browser = os.pipe()  # browser reads fd 3
        from_browser = os.pipe()  # browser writes fd 4
        # Move our ends above fd 4 so the dup2 calls below cannot clobber one another.
        child_in = fcntl.fcntl(to_browser[0], fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser[1], fcntl.F_DUPFD_CLOEXEC, 10)
        args = [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        actions = [
            (os.POSIX_SPAWN_DUP2, child_in, 3),
            (os.POSIX_SPAWN_DUP2, child_out, 4),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
        ]
        self.pid = os.posix_spawn(executable, args, os.environ, file_actions=actions)
        for fd in (to_browser[0], from_browser[1], child_in, child_out, log_fd):
            os.close(fd)
        self._write, self._read = to_browser[1], from_browser[0]
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout=30):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == self._next_id, timeout, method)
        if "error" in reply:
            raise RuntimeError(f"CDP {method} failed: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, name: str, timeout=30) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == name:
                return self.events.pop(i)
        return self._wait(lambda m: m.get("method") == name, timeout, name, keep=False)

    def _wait(self, match, timeout, what, keep=True) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for message in self._messages():
                if match(message):
                    return message
                if keep or "method" in message:
                    self.events.append(message)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no CDP reply for {what} within {timeout}s")
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk

    def _messages(self):
        while b"\0" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\0", 1)
            yield json.loads(raw)

    def close(self):
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self._write)
        os.close(self._read)


_PAGE_PROBE = """JSON.stringify({
  images: Array.from(document.images, i => ({src: i.src.slice(0, 30), complete: i.complete,
                                             width: i.naturalWidth})),
  resources: performance.getEntriesByType('resource').map(e => e.name)
             .filter(u => !u.startsWith('data:')),
  first_section: (document.querySelector('main section') || {}).id || '',
  first_verdict_top: (() => { const li = document.querySelector('#verdicts ul.verdicts li');
                              return li ? li.getBoundingClientRect().top : -1; })(),
  text: document.body.innerText,
})"""


def render_page(executable: str, page: Path, screenshot: Path, workdir: Path, width=1280):
    """Load `page` in headless Chromium; return what it saw and save a full-page PNG."""
    browser = _Browser(executable, workdir / "profile", workdir / "chromium.log")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        session = attached["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session=session)
        _viewport(browser, session, width, 900)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired")
        probe = browser.send(
            "Runtime.evaluate", {"expression": _PAGE_PROBE, "returnByValue": True}, session=session
        )
        seen = json.loads(probe["result"]["value"])
        _screenshot(browser, session, width, screenshot)
        return PageCheck(errors=_errors(browser.events), **seen)
    finally:
        browser.close()


def _viewport(browser, session, width, height):
    metrics = dict(width=width, height=height, deviceScaleFactor=1, mobile=False)
    browser.send("Emulation.setDeviceMetricsOverride", metrics, session=session)


def _screenshot(browser, session, width, path: Path):
    layout = browser.send("Page.getLayoutMetrics", session=session)
    height = int(math.ceil(layout["cssContentSize"]["height"]))
    _viewport(browser, session, width, min(height, 16000))
    shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def _errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(f"uncaught: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return errors
