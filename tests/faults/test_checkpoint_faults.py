"""Checkpoint faults (issue 13, items 3 and 4), against real launched runs: a truncated file of the
newest checkpoint, a planted pickle, and a disk that fills up during a save.

Each asserts the exit status, that the first line naming a problem is about the fault, and that
no complete checkpoint was lost.
"""
import json
import os
import pickle
import resource
import signal
import subprocess
import sys

from tests.faults.faultrun import Run, complete_steps, overrides
from tests.trainer.launch import ROOT
from rundir.checkpoints import file_digest, write_manifest
from trainer.launch import free_port, rank_env, trainer_args

EXIT_SAVE_FAILED = 89


def _train(corpus, run_dir, steps, nproc=2, **extra):
    run = Run.env(nproc, overrides(corpus, run_dir, **{"train.max_steps": steps, "train.save_every": 2,
                                                             "train.keep_last": 3, **extra}))
    return run.finish(), run.text()


def test_truncated_newest_checkpoint_is_named_and_skipped(small_corpus, tmp_path):
    run_dir = tmp_path / "run"
    rc, text = _train(small_corpus, run_dir, 4)
    assert rc == 0, text[-4000:]
    assert complete_steps(run_dir) == [2, 4]
    victim = run_dir / "checkpoints" / "step_00000004" / "tensors" / "rank00001.safetensors"
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    rc = subprocess.run([sys.executable, "-m", "rundir.checkpoints", "verify", str(run_dir)], cwd=ROOT,
                        capture_output=True, text=True)
    assert rc.returncode == 1 and "DAMAGED" in rc.stdout and "step_00000004" in rc.stdout, rc.stdout
    rc, text = _train(small_corpus, run_dir, 6)
    assert rc == 0, text[-4000:]
    warn = next(line for line in text.splitlines() if "skipping checkpoint" in line)
    assert "step_00000004/tensors/rank00001.safetensors" in warn and "the manifest says" in warn, warn
    assert "resumed from" in text and "step_00000002 at step 2" in text, text[-4000:]
    assert complete_steps(run_dir) == [2, 4, 6]   # step 4 saved afresh by the resumed run


class Payload:
    """Unpickling this creates a marker file: proof that code ran from a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path, marker) -> None:
    with open(path, "wb") as f:
        pickle.dump(Payload(marker), f)


def test_a_planted_pickle_never_runs(small_corpus, tmp_path):
    """On every path that reads a checkpoint: resume (its manifest rejects the file, and with a
    forged manifest the safetensors reader refuses it) and the evaluation tools."""
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    rc, text = _train(small_corpus, run_dir, 2, nproc=1)
    assert rc == 0, text[-4000:]
    ckpt = run_dir / "checkpoints" / "step_00000002"
    # DeepSpeed's own file names, which older code and DeepSpeed's loader would unpickle
    _plant(ckpt / "mp_rank_00_model_states.pt", marker)
    _plant(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    _plant(ckpt / "rng" / "rank00000.safetensors", marker)   # in place of a real file
    rc, text = _train(small_corpus, run_dir, 4, nproc=1)
    assert not marker.exists()
    assert rc == 0 and "skipping checkpoint" in text and "rng/rank00000.safetensors" in text, text[-4000:]
    # the run started afresh and saved step 2 again; plant once more, and forge its manifest to
    # list the planted file with its true checksum
    _plant(ckpt / "rng" / "rank00000.safetensors", marker)
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    manifest["files"]["rng/rank00000.safetensors"] = file_digest(str(ckpt / "rng" / "rank00000.safetensors"))
    write_manifest(str(ckpt), 2, manifest["files"], True)
    for name in ("step_00000004",):
        os.rename(run_dir / "checkpoints" / name, tmp_path / name)   # make step 2 the newest again
    (run_dir / "checkpoints" / "latest").write_text("step_00000002\n")
    rc, text = _train(small_corpus, run_dir, 4, nproc=1)
    assert not marker.exists(), "resume unpickled a planted file"
    # a forged manifest does not make the file readable: the checkpoint is damaged (issue 20, item
    # 9), named and skipped like a file whose checksum differs, and the run starts afresh
    assert rc == 0, text[-3000:]
    warn = next(line for line in text.splitlines() if "skipping checkpoint" in line)
    assert "rng/rank00000.safetensors: not a safetensors file" in warn, warn
    proc = subprocess.run([sys.executable, "-m", "evaluation.perplexity", str(ckpt), "--batches", "1", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert not marker.exists(), "an evaluation tool unpickled a planted file"


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_save_that_runs_out_of_space_stops_cleanly(small_corpus, tmp_path):
    """A disk that fills up, emulated without root: files may not grow past 2 MiB (RLIMIT_FSIZE),
    so the save's large tensor file fails as on a full disk (EFBIG where ENOSPC would be)."""
    run_dir = tmp_path / "run"
    rc, text = _train(small_corpus, run_dir, 2, nproc=1)
    assert rc == 0 and complete_steps(run_dir) == [2], text[-4000:]
    before = sorted(p.name for p in (run_dir / "checkpoints" / "step_00000002").rglob("*"))
    args = [sys.executable, *trainer_args(overrides(small_corpus, run_dir, **{"train.max_steps": 4,
                                                                              "train.save_every": 2}))]
    env = {**os.environ, **rank_env(0, 1, free_port())}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env,
                          preexec_fn=_limit_file_size(2 << 20))
    assert proc.returncode == EXIT_SAVE_FAILED, proc.stderr[-4000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: saving checkpoint") and "step_00000004" in line and "free there" in line, line
    assert "File too large" in line, line
    assert complete_steps(run_dir) == [2]
    assert not (run_dir / "checkpoints" / "step_00000004").exists(), "the partial directory stays behind"
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_00000002").rglob("*")) == before
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
