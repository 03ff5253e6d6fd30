"""The import rules of the layout (README "Layout"), checked on the source: no import cycle
between modules of model/, trainer/ and evaluation/ (imports inside functions count too), and
`model` imports nothing of ours. The repository's own copy of the check the README names.

    .venv/bin/python -m pytest tests/test_import_layering.py -q
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("model", "trainer", "evaluation")


def modules() -> dict:
    """{dotted module name: (path, is_package)} of every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, pkg)):
            for n in names:
                if n.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, n), ROOT)[:-3].replace(os.sep, ".")
                    is_pkg = rel.endswith(".__init__")
                    out[rel[:-len(".__init__")] if is_pkg else rel] = (os.path.join(folder, n), is_pkg)
    return out


def imports(mod: str, path: str, is_pkg: bool, known: dict) -> set:
    """The modules of ours that `mod` imports anywhere in its file (absolute or relative)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import name` imports the submodule pkg.name when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:   # an attribute path: the module that holds it
                t = t.rsplit(".", 1)[0]
            if t in known and t != mod:
                found.add(t)
    return found


def graph() -> dict:
    known = modules()
    return {m: imports(m, p, is_pkg, known) for m, (p, is_pkg) in known.items()}


def cycles(g: dict) -> list:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_imports_nothing_of_ours():
    g = graph()
    assert not [(m, t) for m, ts in g.items() if m.startswith("model") for t in ts if not t.startswith("model")]
