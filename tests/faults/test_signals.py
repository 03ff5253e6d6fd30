"""Signals (issue 13, item 6) and a killed rank, against real launched runs.

- SIGUSR1 to one rank during set-up: kept (the handlers are installed first thing), acted on after
  the first step: checkpoint, status 85 through DeepSpeed's launch.py and the `deepspeed` runner.
- SIGTERM to the top-level `deepspeed` process (what a user or a scheduler signals): it dies, but
  no rank is left training: each notices its launcher is gone, checkpoints and exits.
- SIGTERM to `mpiexec`: MPICH's hydra forwards it to every rank, and its status is the ranks' 86.
- kill -9 of a rank: the job ends, with a status the SLURM script retries, and the newest
  complete checkpoint stays the newest.
"""
import re
import signal
import sys
import time

import psutil

from tests.distributed import free_port
from tests.faults.faultrun import Run, complete_steps, first_error_line, last_step, overrides
from tests.trainer.launch import BIN
from trainer.launch import ENTRY

EXIT_REQUEUE, EXIT_STOPPED = 85, 86


def test_sigusr1_during_setup_checkpoints_after_the_first_step(small_corpus, tmp_path):
    run_dir = tmp_path / "usr1"
    run = Run.deepspeed(2, overrides(small_corpus, run_dir, **{"train.max_steps": 50, "train.save_every": 100}))
    ranks = run.wait_for_handlers(2)
    assert last_step(run_dir) == 0 and not (run_dir / "checkpoints").exists(), "still in set-up"
    ranks[1].send_signal(signal.SIGUSR1)   # one rank only: the ranks agree on the flag
    rc, text = run.finish(), run.text()
    assert rc == EXIT_REQUEUE, text[-4000:]
    assert "preemption signal: checkpointed at step 1, exiting with 85" in text
    # no error of ours; the only line that says ERROR is launch.py reporting the status it passes on
    assert "exits with return code = 85" in first_error_line(text) and "Traceback" not in text, text[-4000:]
    assert complete_steps(run_dir) == [1]


def _wait_gone(procs, timeout: float) -> list:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(1)
    return alive


def test_sigterm_to_the_deepspeed_runner_leaves_no_orphan(small_corpus, tmp_path):
    run_dir = tmp_path / "term"
    run = Run.deepspeed(2, overrides(small_corpus, run_dir, **{"train.max_steps": 200, "train.save_every": 100}))
    run.wait_for_step(run_dir, 1)
    ranks = run.ranks()
    launch_py = psutil.Process(run.proc.pid).children()
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=30) == -signal.SIGTERM   # the runner has no handler: it just dies
    try:
        alive = _wait_gone(list(ranks.values()) + launch_py, timeout=300)
        assert not alive, f"orphans still running: {alive}"
    finally:
        run.kill()
    text = run.text()
    stopped = [ln for ln in text.splitlines() if "preemption signal: checkpointed at step" in ln]
    assert stopped and stopped[0].endswith(f"exiting with {EXIT_STOPPED}"), text[-4000:]
    step = int(stopped[0].split("at step ")[1].split(",")[0])
    assert complete_steps(run_dir) == [step]


def test_sigterm_to_mpiexec_reaches_every_rank(small_corpus, tmp_path):
    run_dir = tmp_path / "mpi"
    run = Run([str(BIN / "mpiexec"), "-n", "2", sys.executable, ENTRY, "--config", "configs/tiny.yaml",
               *overrides(small_corpus, run_dir, **{"train.max_steps": 200, "train.save_every": 100})],
              env={"MASTER_PORT": str(free_port())})
    run.wait_for_step(run_dir, 1)
    run.proc.send_signal(signal.SIGTERM)
    rc, text = run.finish(timeout=300), run.text()
    assert rc == EXIT_STOPPED, text[-4000:]
    assert text.count("exiting with 86") == 2 and first_error_line(text) == "", text[-4000:]
    assert len(complete_steps(run_dir)) == 1


def test_kill_9_of_a_rank_ends_the_job_and_keeps_the_checkpoint(small_corpus, tmp_path):
    run_dir = tmp_path / "kill9"
    run = Run.deepspeed(2, overrides(small_corpus, run_dir, **{"train.max_steps": 200, "train.save_every": 2}))
    run.wait_for_step(run_dir, 3)
    saved = complete_steps(run_dir)
    run.ranks()[1].kill()
    rc, text = run.finish(timeout=120), run.text()
    assert rc not in (0, 2, 85, 86, 87), text[-4000:]   # a failure: the SLURM script requeues it
    # the first word is gloo's on the surviving rank, which names the cause; the launcher then
    # names the killed rank and its status
    line = first_error_line(text)
    assert re.search(r"Connection (closed|reset) by peer|exits with return code = -9", line), line
    assert "exits with return code = -9" in text
    kept = complete_steps(run_dir)
    assert set(saved) <= set(kept) and (run_dir / "checkpoints" / "latest").read_text().strip() == \
        f"step_{kept[-1]:08d}"
