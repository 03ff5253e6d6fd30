"""The packages' imports run one way (DESIGN.md "Layout"), counting imports inside functions:

    model  <-  rundir  <-  trainer  <-  evaluation        (and train.py, the entry point, above all)

model imports nothing of ours; rundir (the run directory: config, checkpoint format, tokenizer)
only model; trainer never evaluation; evaluation never the training loop. And no two files import
each other, directly or around a longer circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "rundir", "trainer", "evaluation")
# what each package may import of ours (besides itself)
ALLOWED = {"model": set(), "rundir": {"model"}, "trainer": {"model", "rundir"},
           "evaluation": {"model", "rundir", "trainer"}}
TRAINING_LOOP = ("trainer.loop", "trainer.session", "trainer.engine", "trainer.hooks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, mod: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file `mod`, at any depth."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this file's package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]   # `from pkg import module`
    return found


def our_files() -> dict[str, Path]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    files["train"] = ROOT / "train.py"
    return files


def graph() -> dict[str, dict[str, int]]:
    """{module: {imported module of ours: line}}, keeping only names that are our files."""
    files = our_files()
    return {mod: {name: line for name, line in imports_of(path, mod) if name in files and name != mod}
            for mod, path in files.items()}


def layering_violations(g: dict) -> list:
    wrong = []
    for mod, deps in g.items():
        pkg = mod.split(".")[0]
        if pkg not in ALLOWED:
            continue
        for dep, line in deps.items():
            dep_pkg = dep.split(".")[0]
            if dep_pkg != pkg and dep_pkg not in ALLOWED[pkg]:
                wrong.append(f"{mod} (line {line}) imports {dep}")
            if pkg == "evaluation" and dep.startswith(TRAINING_LOOP):
                wrong.append(f"{mod} (line {line}) imports the training loop's {dep}")
    return wrong


def test_packages_import_one_way():
    wrong = layering_violations(graph())
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycle_between_files():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"files that import each other (directly or around a circle): {cycles}"


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    """An import buried in a function body of a trainer module (relative or absolute) is found
    and reported, so the tests above can fail."""
    probe = tmp_path / "probe.py"
    probe.write_text("def later():\n    from ..evaluation.tasks import TrainingTasks\n"
                     "    import evaluation.report\n    return TrainingTasks\n")
    found = dict(imports_of(probe, "trainer.probe"))
    assert found.get("evaluation.tasks") == 2 and found.get("evaluation.report") == 3
    g = graph()
    g["trainer.probe"] = {"evaluation.tasks": 2}
    assert layering_violations(g) == ["trainer.probe (line 2) imports evaluation.tasks"]
