"""Static structure of kdaudit checkouts, side by side, to compare a restructuring's before/after.

    python benchmarks/structure.py [ROOT ...]   # default ROOT: the repo containing this script

For each ROOT (one column each) it prints:
1. lines per module (kdaudit/**/*.py), the total, the number of modules and the median;
2. import cycles: strongly connected components (size > 1) of the graph of every import
   statement between kdaudit modules (function-level and `if TYPE_CHECKING:` ones included);
3. upward edges in that graph against LAYERS, and the depth: the longest chain of
   import-time imports through the acyclic condensation;
4. what importing a few modules really loads, each in a fresh interpreter with
   PYTHONPATH=ROOT: kdaudit modules, heavy third-party packages, and the import's wall time.

Imports are read as /work/shared/tools/layering.py reads them: relative imports resolved,
`from kdaudit.x import name` is kdaudit.x.name when that is a module, else kdaudit.x; a module
importing from an enclosing package's __init__ (the registration idiom) is not an edge.
Only the standard library is used, and nothing is written into the ROOTs.
"""

from __future__ import annotations

import ast
import json
import os
import statistics
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

# Module-name prefix -> layer (longest prefix wins), old and new names alike. A module may
# import only from its own layer or below. "kdaudit" is the root __init__ only, so a module
# no prefix covers is reported as unlayered instead of silently landing in layer 0.
LAYERS = {
    "kdaudit": 0,
    "kdaudit.errors": 0,
    "kdaudit.registry": 0,
    "kdaudit.user_code": 0,
    "kdaudit.metrics": 1,
    "kdaudit.data": 1,
    "kdaudit.models": 1,
    "kdaudit.conditions": 1,
    "kdaudit.features": 1,
    "kdaudit.targeted": 1,
    "kdaudit.config": 2,
    "kdaudit.stats": 2,
    "kdaudit.protocol": 3,
    "kdaudit.store": 3,
    "kdaudit.report": 3,
    "kdaudit.results": 3,
    "kdaudit.engine": 4,
    "kdaudit.train": 4,
    "kdaudit.stacked": 4,
    "kdaudit.accel": 4,
    "kdaudit.runner": 4,
    "kdaudit.executors": 5,
    "kdaudit.progress": 5,
    "kdaudit.compare": 6,
    "kdaudit.objects": 6,
    "kdaudit.api": 6,
    "kdaudit.cli": 7,
}
PROBED = (
    "kdaudit.models",
    "kdaudit.data",
    "kdaudit.metrics",
    "kdaudit.stats",
    "kdaudit.report",
    "kdaudit.config",
    "kdaudit.conditions",
)
HEAVY = ("torch", "pandas", "scipy", "matplotlib", "ray")
PROBE_TIMEOUT_S = 300
CELL_WIDTH = 60  # wider cells wrap onto several lines

PROBE = """\
import json, sys, time
t = time.perf_counter()
import {mod}
seconds = time.perf_counter() - t
names = sorted(m for m in sys.modules if m == "kdaudit" or m.startswith("kdaudit."))
print(json.dumps({{
    "file": sys.modules["{mod}"].__file__,
    "seconds": seconds,
    "modules": names,
    "heavy": [h for h in {heavy!r} if h in sys.modules],
}}))
"""


@dataclass
class Checkout:
    """One kdaudit tree, parsed once; every measure reads from here."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    trees: dict[str, ast.Module] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading the source


def module_name(path: Path, root: Path) -> str:
    """Dotted name of a source file, so that files and import targets can be matched."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load(root: Path) -> Checkout:
    """Parse every kdaudit file; a file that does not parse (mid-edit) is noted, not fatal."""
    co = Checkout(root)
    for path in sorted((root / "kdaudit").rglob("*.py")):
        mod = module_name(path, root)
        text = path.read_text(encoding="utf-8", errors="replace")
        co.files[mod], co.lines[mod] = path, len(text.splitlines())
        try:
            co.trees[mod] = ast.parse(text, filename=str(path))
        except SyntaxError:
            co.broken.append(mod)
    return co


def import_nodes(tree: ast.AST, at_import_time: bool):
    """Import statements; with at_import_time only those run when the module is imported
    (not in a function body, not under `if TYPE_CHECKING:`), which is what depth is about."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if at_import_time and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if (
            at_import_time
            and isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test)
        ):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def resolve(name: str, files: dict[str, Path]) -> str | None:
    """The kdaudit module a dotted name lands in: the longest prefix that is a module."""
    while name and name not in files:
        name = name.rpartition(".")[0]
    return name or None


def from_base(node: ast.ImportFrom, package: str) -> str:
    """Absolute module named by a `from X import` statement, relative levels resolved."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    up = parts[: len(parts) - (node.level - 1)] if node.level - 1 <= len(parts) else []
    return ".".join(up + ([node.module] if node.module else []))


def targets(node: ast.Import | ast.ImportFrom, package: str, files: dict[str, Path]) -> set[str]:
    """kdaudit modules one statement imports; `from a import b` means a.b if that is a module."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = from_base(node, package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
    found = {resolve(n, files) for n in names if n == "kdaudit" or n.startswith("kdaudit.")}
    return {t for t in found if t}


def is_registration(mod: str, target: str, files: dict[str, Path]) -> bool:
    """A module taking its enclosing package's registry; not a real dependency for cycles."""
    return mod.startswith(target + ".") and files[target].name == "__init__.py"


def edges(co: Checkout, at_import_time: bool = False) -> dict[str, set[str]]:
    """Import graph between kdaudit modules, registration idiom and self-imports left out."""
    graph: dict[str, set[str]] = {m: set() for m in co.files}
    for mod, tree in co.trees.items():
        is_pkg = co.files[mod].name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in import_nodes(tree, at_import_time):
            for t in targets(node, package, co.files):
                if t != mod and not is_registration(mod, t, co.files):
                    graph[mod].add(t)
    return graph


# ---------------------------------------------------------------- graph measures


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), each sorted; cycles are those of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others."""
    return sorted(c for c in components(graph) if len(c) > 1)


def layer_of(mod: str) -> int | None:
    """Layer by longest matching prefix; the bare "kdaudit" prefix covers the root only."""
    covering = [p for p in LAYERS if mod == p or (p != "kdaudit" and mod.startswith(p + "."))]
    best = max(covering, key=len, default=None)
    return None if best is None else LAYERS[best]


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str, int, int]]:
    """Edges from a lower layer to a higher one: the dependencies the layering forbids."""
    out = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and la < lb:
                out.append((a, b, la, lb))
    return out


def depth(graph: dict[str, set[str]]) -> tuple[int, list[list[str]]]:
    """Longest import chain through the condensation (a cycle counts as one step), with the
    chain itself: how many layers the import-time dependencies really stack up to."""
    comps = components(graph)
    comp_of = {m: i for i, c in enumerate(comps) for m in c}
    succ = {i: {comp_of[w] for m in c for w in graph[m]} - {i} for i, c in enumerate(comps)}
    memo: dict[int, list[int]] = {}

    def longest(i: int) -> list[int]:
        if i not in memo:
            tails = [longest(j) for j in sorted(succ[i])]
            memo[i] = [i, *max(tails, key=len, default=[])]
        return memo[i]

    chain = max((longest(i) for i in range(len(comps))), key=len, default=[])
    return len(chain), [comps[i] for i in chain]


# ---------------------------------------------------------------- runtime probe


def warm_up() -> None:
    """Import the heavy packages once beforehand, so the first probe does not pay alone for a
    cold disk cache and timings stay comparable across modules and roots."""
    code = f"import importlib\nfor h in {HEAVY!r}:\n    try: importlib.import_module(h)\n"
    code += "    except Exception: pass"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=PROBE_TIMEOUT_S)


def exists(co: Checkout, mod: str) -> bool:
    """Whether the module is in this tree, so a probe of a missing module is skipped."""
    return mod in co.files


def probe(root: Path, mod: str) -> dict | str:
    """Import mod in a fresh interpreter with ROOT first on the path; the result, or a line
    saying why it failed (a tree mid-restructuring may not import at all)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # leave no __pycache__ in ROOT
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    code = PROBE.format(mod=mod, heavy=HEAVY)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,  # the script's own repo must not shadow ROOT through sys.path[0]
            env=env,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"import failed: timed out after {PROBE_TIMEOUT_S} s"
    if proc.returncode != 0:
        return "import failed: " + last_line(proc.stderr)
    try:
        result = json.loads(last_line(proc.stdout))
    except json.JSONDecodeError:
        return "import failed: unreadable output: " + last_line(proc.stdout)
    if not Path(result["file"]).resolve().is_relative_to(root):
        return f"import failed: loaded from {result['file']}, not from {root}"
    return result


def last_line(text: str) -> str:
    """The last non-empty line: for a traceback, the exception itself."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no output)"


# ---------------------------------------------------------------- rendering


def short(mod: str) -> str:
    """Module name without the kdaudit. prefix, to keep listings narrow."""
    return mod.removeprefix("kdaudit.")


def table(head: list[str], rows: list[list[str]]) -> str:
    """Columns left-aligned; cells past CELL_WIDTH (not the first column) wrap."""
    wrapped = [
        [[c]] + [textwrap.wrap(x, CELL_WIDTH) or [""] for x in rest] for c, *rest in [head, *rows]
    ]
    widths = [max(len(ln) for r in wrapped for ln in r[i]) for i in range(len(head))]
    out = []
    for r in wrapped:
        for k in range(max(len(cell) for cell in r)):
            parts = [
                (cell[k] if k < len(cell) else "").ljust(w)
                for cell, w in zip(r, widths, strict=True)
            ]
            out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def listing(labels: list[str], items: list[list[str]]) -> str:
    """Items per root: a plain list for one root, a presence table (x or -) for several."""
    if len(labels) == 1:
        return "\n".join(f"  {i}" for i in items[0]) or "  (none)"
    union = sorted(set().union(*items))
    rows = [[f"  {i}"] + ["x" if i in got else "-" for got in items] for i in union]
    return table(["", *labels], rows) if rows else "  (none)"


def header(title: str) -> str:
    """A section title, underlined, so the four measures stand apart."""
    return f"\n{title}\n{'=' * len(title)}"


# ---------------------------------------------------------------- the four measures


def section_lines(cos: list[Checkout], labels: list[str]) -> str:
    """Measure 1: lines per module, the total, the module count and the median."""
    by_path = [
        {co.files[m].relative_to(co.root).as_posix(): n for m, n in co.lines.items()} for co in cos
    ]
    paths = sorted(set().union(*by_path))
    rows = [[p, *[str(bp[p]) if p in bp else "-" for bp in by_path]] for p in paths]
    rows.append(["total lines", *[str(sum(co.lines.values())) for co in cos]])
    rows.append(["modules", *[str(len(co.lines)) for co in cos]])
    rows.append(["median lines", *[median(co) for co in cos]])
    rows.append(["unparsable", *[", ".join(map(short, co.broken)) or "none" for co in cos]])
    return header("1. Lines per module") + "\n" + table(["path", *labels], rows)


def median(co: Checkout) -> str:
    """Median lines per module, or '-' for an empty tree."""
    return f"{statistics.median(co.lines.values()):g}" if co.lines else "-"


def section_cycles(graphs: list[dict[str, set[str]]], labels: list[str]) -> str:
    """Measure 2: import cycles over every import statement."""
    found = [cycles(g) for g in graphs]
    counts = table(["", *labels], [["cycles", *[str(len(f)) for f in found]]])
    items = [[" <-> ".join(map(short, c)) for c in f] for f in found]
    title = "2. Import cycles (every import statement; kdaudit. prefix dropped)"
    return f"{header(title)}\n{counts}\n{listing(labels, items)}"


def section_layers(cos: list[Checkout], graphs, labels: list[str]) -> str:
    """Measure 3: upward edges against LAYERS, unlayered modules, and import-time depth."""
    ups = [upward(g) for g in graphs]
    depths = [depth(edges(co, at_import_time=True)) for co in cos]
    unlayered = [sorted(short(m) for m in co.files if layer_of(m) is None) for co in cos]
    rows = [
        ["upward edges", *[str(len(u)) for u in ups]],
        ["unlayered modules", *[", ".join(u) or "none" for u in unlayered]],
        ["depth (import time)", *[str(n) for n, _ in depths]],
        ["longest chain", *[" -> ".join(chain_text(c) for c in ch) for _, ch in depths]],
    ]
    items = [[f"{short(a)} -> {short(b)}  (layer {la} -> {lb})" for a, b, la, lb in u] for u in ups]
    title = "3. Layers (every import statement; depth: import-time imports only)"
    return f"{header(title)}\n{table(['', *labels], rows)}\nupward edges:\n{listing(labels, items)}"


def chain_text(comp: list[str]) -> str:
    """One step of the longest chain; a cycle shows as {a, b}."""
    names = [short(m) for m in comp]
    return names[0] if len(names) == 1 else "{" + ", ".join(names) + "}"


def probe_rows(mod: str, results: list) -> list[list[str]]:
    """Rows for one probed module, one cell per root: '-' if absent, the failure if failed."""
    rows = [[f"import {mod}"], ["  kdaudit modules"], ["  subpackages"]]
    rows += [[f"  {h}"] for h in HEAVY] + [["  import time"]]
    for r in results:
        if not isinstance(r, dict):
            cells = ["-"] * len(rows) if r == "-" else [r] + [""] * (len(rows) - 1)
        else:
            subs = sorted({m.split(".")[1] for m in r["modules"] if m != "kdaudit"})
            cells = ["", str(len(r["modules"])), ", ".join(subs) or "none"]
            cells += ["yes" if h in r["heavy"] else "no" for h in HEAVY]
            cells.append(f"{r['seconds'] * 1000:.0f} ms")
        for row, cell in zip(rows, cells, strict=True):
            row.append(cell)
    return rows


def section_probes(cos: list[Checkout], labels: list[str]) -> str:
    """Measure 4: what `import MOD` loads and costs in a fresh interpreter."""
    warm_up()
    rows = []
    for mod in PROBED:
        if not any(exists(co, mod) for co in cos):
            continue
        results = [probe(co.root, mod) if exists(co, mod) else "-" for co in cos]
        rows += probe_rows(mod, results)
    title = "4. What importing a module loads (fresh interpreter, PYTHONPATH=ROOT, no .pyc)"
    return f"{header(title)}\n{table(['', *labels], rows)}"


def main(argv: list[str]) -> int:
    """Parse every root, then print the four measures with one column per root."""
    roots = [Path(a).resolve() for a in argv] or [Path(__file__).resolve().parents[1]]
    for r in roots:
        if not (r / "kdaudit").is_dir():
            print(f"{r}: no kdaudit package here", file=sys.stderr)
            return 2
    cos = [load(r) for r in roots]
    labels = [str(r) for r in roots]
    graphs = [edges(co) for co in cos]
    print("kdaudit structure: " + "  |  ".join(labels))
    print(section_lines(cos, labels))
    print(section_cycles(graphs, labels))
    print(section_layers(cos, graphs, labels))
    print(section_probes(cos, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
