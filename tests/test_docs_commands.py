"""Every command the README and docs/ show exists and takes the options shown.

Each line of a fenced shell block that runs one of ours (`python -m M`, `python path.py`,
`deepspeed train.py`, `bash path.sh`, `make target`) is checked: the module, script or target
exists, and every `--option` on the line is one its `--help` lists. The commands that run whole
pipelines (training, prepare, sample, export, ...) are also run end to end by the tests of their
packages; this test keeps the manual from drifting away from the code."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
        ROOT / "slurm" / "README.md"]
FENCE = re.compile(r"```(?:bash|sh|shell)?\n(.*?)```", re.S)


def shell_lines(text: str) -> list[str]:
    """Commands of the fenced shell blocks, continuation lines joined, comments dropped."""
    out = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def program_of(line: str):
    """(kind, target, options) of a line that runs one of ours, else None."""
    words = line.split()
    options = sorted({w.split("=")[0] for w in words if w.startswith("--") and len(w) > 2})
    for i, w in enumerate(words):
        if w.endswith("python") or w.endswith("python3") or w.endswith("/python"):
            if words[i + 1:i + 2] == ["-m"] and len(words) > i + 2:
                module = words[i + 2].strip("`")
                sub = words[i + 3] if len(words) > i + 3 and re.fullmatch(r"[a-z_]+", words[i + 3]) else ""
                return ("module", f"{module} {sub}".strip(), options) if module.split(".")[0] in OUR_PACKAGES else None
            if len(words) > i + 1 and words[i + 1].endswith(".py"):
                return "script", words[i + 1], options
        script = next((x for x in words[i + 1:] if x.endswith(".py")), None)
        if (w == "deepspeed" or w.endswith("/deepspeed")) and script:
            return ("script", script, [o for o in options if o not in ("--num_gpus", "--num_nodes",
                                                                       "--master_port", "--hostfile")])
        if w == "bash" and len(words) > i + 1 and words[i + 1].endswith(".sh"):
            return "file", words[i + 1], []
        if w == "make" and len(words) > i + 1:
            return "make", words[i + 1], []
    return None


def documented() -> list[tuple[str, str, str, list]]:
    found = []
    for doc in DOCS:
        if not doc.exists():
            continue
        for line in shell_lines(doc.read_text()):
            prog = program_of(line)
            if prog:
                found.append((doc.relative_to(ROOT).as_posix(), *prog))
    return found


HELP_PROBE = r"""
import contextlib, io, json, runpy, sys
out = {}
for kind, key in json.loads(sys.argv[1]):
    target, _, sub = key.partition(" ")
    buf = io.StringIO()
    for argv in ([target, "--help"], [target, sub, "--help"]) if sub else ([target, "--help"],):
        sys.argv = argv
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            try:
                runpy.run_module(target, run_name="__main__") if kind == "module" else runpy.run_path(target, run_name="__main__")
            except SystemExit:
                pass
            except Exception as err:
                buf.write(f"<error {type(err).__name__}: {err}>")
    out[key] = buf.getvalue()
print(json.dumps(out))
"""

# programs whose argument parsing depends on files a run writes (run directories), or that are
# not ours (lm-eval's own CLI is reached through our adapter module)
NOT_OURS = ("runs/", "checkpoints/", "zero_to_fp32.py")   
OUR_PACKAGES = ("model", "rundir", "trainer", "evaluation", "benchmarks")


def test_every_documented_command_exists_and_takes_its_options():
    commands = [c for c in documented() if not (c[2] or "").startswith(NOT_OURS)]
    assert len(commands) >= 20, f"the docs show fewer commands than expected: {commands}"
    missing, probes = [], {}
    makefile = (ROOT / "Makefile").read_text()
    for doc, kind, target, options in commands:
        if kind == "module":
            path = ROOT / target.split()[0].replace(".", "/")
            if not (path.with_suffix(".py").exists() or (path / "__main__.py").exists()):
                missing.append(f"{doc}: python -m {target.split()[0]}: no such module")
            elif options:
                probes[target] = ("module", target)
        elif kind == "script":
            if not target or not (ROOT / target).exists():
                missing.append(f"{doc}: {target}: no such script")
            elif options:
                probes[target] = ("script", target)
        elif kind == "file" and not (ROOT / target).exists():
            missing.append(f"{doc}: bash {target}: no such file")
        elif kind == "make" and not re.search(rf"^{re.escape(target)}:", makefile, re.M):
            missing.append(f"{doc}: make {target}: no such target")
    assert not missing, "\n".join(missing)
    helps = json.loads(subprocess.run([sys.executable, "-c", HELP_PROBE, json.dumps(list(probes.values()))],
                                      cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    wrong = []
    for doc, kind, target, options in commands:
        text = helps.get(target)
        if text is None:
            continue
        for opt in options:
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text):
                wrong.append(f"{doc}: {target} {opt}: not among its options")
    assert not wrong, "\n".join(wrong)


def test_the_check_catches_a_wrong_option_and_a_missing_module():
    assert program_of("python -m evaluation.sample runs/x --gen-length 4") == \
        ("module", "evaluation.sample", ["--gen-length"])
    assert program_of("python -m evaluation.hf export runs/x out --dtype bf16") == \
        ("module", "evaluation.hf export", ["--dtype"])
    assert program_of("deepspeed --num_gpus 2 train.py --config c.yaml") == ("script", "train.py", ["--config"])
    assert program_of("ls -la") is None
