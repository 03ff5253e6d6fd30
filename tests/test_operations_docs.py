"""The commands of docs/operations-safety.md that are not run by another test: activating the
environment, and signalling the ranks of your own `deepspeed` job by PID (never `pkill -f` by a
pattern, which reaches every user's ranks on a shared node). Issue 20, item 14."""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what docs/operations-safety.md shows, verbatim
ACTIVATE = "source .venv/bin/activate"
SIGNAL_OWN_RANKS = 'pkill -USR1 -P "$(pgrep -d, -P "$DS_PID")"'


def test_activating_the_environment_puts_its_python_and_deepspeed_first():
    proc = subprocess.run(["bash", "-c", f"{ACTIVATE} && command -v python && command -v deepspeed"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert proc.returncode == 0, proc.stderr
    python, deepspeed = proc.stdout.split()
    venv = os.path.realpath(os.path.join(ROOT, ".venv"))
    assert os.path.realpath(os.path.dirname(python)) == os.path.join(venv, "bin")
    assert os.path.realpath(os.path.dirname(deepspeed)) == os.path.join(venv, "bin")


# A process tree shaped like a `deepspeed` job: the runner, its launch.py child, and the ranks as
# the launch.py's children, each with `train.py --local_rank=N` in its command line (the
# pattern the old advice matched). Stand-ins, because the point is which processes a shell
# command reaches; tests/faults/test_signals.py signals real DeepSpeed ranks.
TREE = r'''
import os, signal, subprocess, sys, time
level, folder, job = sys.argv[1], sys.argv[2], sys.argv[3]
if level == "runner":
    child = subprocess.Popen([sys.executable, __file__, "launch", folder, job])
    child.wait()
elif level == "launch":
    kids = [subprocess.Popen([sys.executable, __file__, "rank", folder, job, "train.py", f"--local_rank={r}"])
            for r in (0, 1)]
    for k in kids:
        k.wait()
else:
    rank = sys.argv[5].split("=")[1]
    signal.signal(signal.SIGUSR1, lambda *a: open(os.path.join(folder, f"{job}-rank{rank}.usr1"), "w").close())
    open(os.path.join(folder, f"{job}-rank{rank}.ready"), "w").close()
    for _ in range(600):
        time.sleep(0.1)
'''


def test_signalling_by_pid_reaches_your_own_ranks_and_no_one_elses(tmp_path):
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    jobs = {j: subprocess.Popen([sys.executable, str(script), "runner", str(tmp_path), j]) for j in ("mine", "other")}
    try:
        deadline = time.time() + 60
        while len(list(tmp_path.glob("*.ready"))) < 4 and time.time() < deadline:
            time.sleep(0.1)
        assert len(list(tmp_path.glob("*.ready"))) == 4
        proc = subprocess.run(["bash", "-c", SIGNAL_OWN_RANKS], env={**os.environ, "DS_PID": str(jobs["mine"].pid)},
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        deadline = time.time() + 30
        while len(list(tmp_path.glob("*.usr1"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert sorted(p.name for p in tmp_path.glob("*.usr1")) == ["mine-rank0.usr1", "mine-rank1.usr1"]
        assert jobs["mine"].poll() is None and jobs["other"].poll() is None   # launchers untouched
    finally:
        for p in jobs.values():   # this test's own trees, by PID
            import psutil
            for kid in psutil.Process(p.pid).children(recursive=True):
                kid.kill()
            p.kill()
            p.wait(timeout=30)
