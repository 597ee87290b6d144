"""The project's import graph: every ``import`` (module level or inside a function) between its own modules.

``python tools/import_graph.py`` prints the cycles (strongly connected components with more than one
module, or a module importing itself) and exits 1 when there is one; ``--edges`` prints every edge.
Modules are files under minitron_nemo/, recipes/, launchers/, bench/ and tools/; a bare ``import x`` in a
script resolves to a sibling file ``x.py`` (scripts put their own folder on ``sys.path``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("minitron_nemo", "recipes", "launchers", "bench", "tools")


def modules() -> dict:
    """``{dotted name: path}`` for every scanned file (packages by their ``__init__``)."""
    out = {}
    for top in SCANNED:
        for p in sorted((ROOT / top).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _target(name: str, known: dict) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.c`` -> ``a.b`` when ``c`` is a name)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(mod: str, path: Path, known: dict) -> set:
    tree = ast.parse(path.read_text(), str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        for n in names:
            t = _target(n, known)
            if t is None and not (ROOT / package.replace(".", "/") / "__init__.py").exists():
                t = _target(f"{package}.{n}", known)  # a script's sibling file
                t = t if t and t != package else None
            if t and t != mod:
                out.add(t)
    return out


def graph() -> dict:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def cycles(g: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    g = graph()
    if "--edges" in argv:
        for m in sorted(g):
            for t in sorted(g[m]):
                print(f"{m} -> {t}")
    found = cycles(g)
    for c in found:
        print("cycle: " + " <-> ".join(c))
    print(f"{len(g)} modules, {sum(map(len, g.values()))} import edges, {len(found)} cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
