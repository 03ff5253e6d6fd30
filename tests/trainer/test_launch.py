"""trainer/launch.py, the one launcher, on small real processes (plain python, no trainer): the
env:// variables each rank sees, one process group that a timeout kills whole, a failing rank's
status, and the commands it builds. The trainer under both launchers: tests/trainer/test_train.py."""
import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from trainer import launch
from trainer.launch import ENTRY, ROOT, deepspeed_command, free_port, start, trainer_args

SHOW_ENV = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in "
            "('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'EXTRA')}), flush=True)")


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_env_ranks_get_the_variables_a_launcher_sets(tmp_path):
    run = start(3, ["-c", SHOW_ENV], env={"EXTRA": "x"}, log=tmp_path / "out.log")
    assert run.wait(timeout=60) == 0, run.text()
    seen = sorted((json.loads(line) for line in run.text().splitlines()), key=lambda d: d["RANK"])
    assert [d["RANK"] for d in seen] == ["0", "1", "2"] and [d["LOCAL_RANK"] for d in seen] == ["0", "1", "2"]
    assert {d["WORLD_SIZE"] for d in seen} == {"3"} and {d["MASTER_ADDR"] for d in seen} == {"127.0.0.1"}
    assert len({d["MASTER_PORT"] for d in seen}) == 1 and {d["EXTRA"] for d in seen} == {"x"}


def test_a_timeout_kills_every_process_of_the_group(tmp_path):
    """Each rank starts a grandchild; after the timeout none of them is left."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            "print('up', flush=True); time.sleep(300)")
    run = start(2, ["-c", code], log=tmp_path / "out.log")
    while run.text().count("up") < 2:
        time.sleep(0.1)
    family = [psutil.Process(p.pid) for p in run.procs]
    family += [c for p in family for c in p.children(recursive=True)]
    assert len(family) == 4
    with pytest.raises(subprocess.TimeoutExpired):
        run.wait(timeout=1)
    time.sleep(0.5)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


def test_a_failed_rank_ends_the_run_with_its_status(tmp_path, monkeypatch):
    """Rank 1 exits 7 while rank 0 would wait on: the run ends (after the grace) with status 7."""
    monkeypatch.setattr(launch, "FAIL_GRACE_S", 0.5)
    code = "import os, sys, time; sys.exit(7) if os.environ['RANK'] == '1' else time.sleep(300)"
    run = start(2, ["-c", code], log=tmp_path / "out.log")
    assert run.wait(timeout=60) == 7
    assert run.procs[0].returncode == -9


def test_commands():
    args = trainer_args(["train.max_steps=2"], config="configs/tiny.yaml", ds_config="ds_configs/zero1.json")
    assert args == [ENTRY, "--ds_config", "ds_configs/zero1.json", "--config", "configs/tiny.yaml", "train.max_steps=2"]
    assert (ROOT / ENTRY).is_file()
    cmd = deepspeed_command(2, args, port=1234)
    assert cmd[0] == os.path.join(os.path.dirname(sys.executable), "deepspeed") and os.access(cmd[0], os.X_OK)
    assert cmd[1:5] == ["--num_gpus", "2", "--master_port", "1234"] and cmd[5:] == args


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="launcher='srun': expected one of deepspeed, env"):
        start(1, ["-c", "pass"], launcher="srun")
    with pytest.raises(ValueError, match="nproc=0"):
        start(0, ["-c", "pass"])
