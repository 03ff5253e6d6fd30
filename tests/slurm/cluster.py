"""A throwaway SLURM cluster on this one host, for the tests in tests/slurm.

Everything lives in one temporary directory: a fresh munge key and its own
``munged`` (own socket, pid, log and seed files), one ``slurmctld`` and two
``slurmd`` daemons that pretend to be two compute nodes (``node1``/``node2``,
both ``NodeAddr=127.0.0.1``, each with its own ``Port=`` and spool directory;
``slurmd -N NAME`` picks which node a daemon is). Client commands are pointed
at the cluster through ``SLURM_CONF`` (see :attr:`SlurmCluster.env` and
:meth:`SlurmCluster.run`); nothing under /etc is read or changed.

Every daemon runs in the foreground as a direct child of this process, so its
PID is known; :meth:`SlurmCluster.stop` cancels the jobs, then stops the
daemons by those PIDs (SIGTERM, wait, SIGKILL) and never by name.

Manual use (needs root; prints how to use the cluster, Ctrl-C stops it)::

    .venv/bin/python tests/slurm/cluster.py [--dir DIR]
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / ".ci" / "install_slurm.sh"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the throwaway cluster at all (the reason says why)."""


class ClusterError(RuntimeError):
    """The cluster should have worked but did not (daemon logs attached)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if _which(b) is None]


def ensure_binaries(try_install: bool = True) -> None:
    """Make sure the SLURM/munge binaries exist, installing them if possible.

    Raises ClusterUnavailable with the exact reason when they are missing and
    cannot be installed (not root, no apt-get, the installer failed, or
    installing was disabled with ECDLM_SLURM_NO_INSTALL=1).
    """
    missing = missing_binaries()
    if not missing:
        return
    why = f"SLURM/munge binaries not found: {', '.join(missing)}"
    if not try_install or os.environ.get("ECDLM_SLURM_NO_INSTALL") == "1":
        raise ClusterUnavailable(f"{why}; installing disabled (run {INSTALLER} as root)")
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"{why}; cannot install them without root (run {INSTALLER} as root)")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable(f"{why}; cannot install them: no apt-get on this machine")
    try:
        proc = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise ClusterUnavailable(f"{why}; {INSTALLER} timed out after 900 s") from None
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise ClusterUnavailable(f"{why}; {INSTALLER} failed with status {proc.returncode}:\n{tail}")
    still = missing_binaries()
    if still:
        raise ClusterUnavailable(f"{INSTALLER} ran but these are still missing: {', '.join(still)}")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def parse_scontrol(text: str) -> dict[str, str]:
    """Parse ``scontrol show ... -o`` output (``Key=Value`` words) into a dict.

    Values with spaces (rare: e.g. Reason, Command with args) keep only their
    first word; the keys the tests use (JobState, RestartCnt, NodeList,
    ExitCode, NodeAddr, ...) have none.
    """
    out: dict[str, str] = {}
    for word in text.split():
        if "=" in word:
            k, v = word.split("=", 1)
            out.setdefault(k, v)
    return out


class SlurmCluster:
    """Start/stop a two-node SLURM cluster whose state lives under ``root``."""

    def __init__(
        self,
        root: str | Path | None = None,
        nodes: Sequence[str] = ("node1", "node2"),
        cpus_per_node: int = 2,
        real_memory_mb: int = 2000,
        kill_wait_s: int = 10,
    ):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="ecdlm-slurm-"))
        self.root.mkdir(parents=True, exist_ok=True)
        # munged refuses group/world-writable directories on the way to its key
        # and socket, and wants its socket directory searchable by everyone.
        os.chmod(self.root, 0o755)
        self.nodes = list(nodes)
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.kill_wait_s = kill_wait_s
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logdir = self.root / "log"
        self.procs: dict[str, subprocess.Popen] = {}  # daemon label -> process
        self.pids: dict[str, int] = {}
        self.env: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self._released: set[tuple[str | None, int]] = set()

    # ------------------------------------------------------------------ setup
    def _write_files(self) -> None:
        r = self.root
        for d in ("etc", "munge", "munge-key", "log", "state", "run", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)
        os.chmod(r / "munge-key", 0o700)
        key = r / "munge-key" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)

        ports = _free_ports(1 + len(self.nodes))
        self.ports = {"slurmctld": ports[0], **{n: p for n, p in zip(self.nodes, ports[1:])}}
        (r / "etc" / "plugstack.conf").write_text("")  # no SPANK plugins from /etc
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={self.ports[n]} "
            f"CPUs={self.cpus_per_node} RealMemory={self.real_memory_mb} State=UNKNOWN"
            for n in self.nodes
        )
        self.conf.write_text(
            f"""# Generated by tests/slurm/cluster.py: throwaway test cluster, all state under {r}
ClusterName=ecdlmtest
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={self.ports['slurmctld']}
SlurmdPort={self.ports[self.nodes[0]]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={self.logdir}/slurmctld.log
SlurmdLogFile={self.logdir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={r}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait={self.kill_wait_s}
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=120
{node_lines}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # Never let variables of an enclosing allocation leak into our clients.
        for k in list(self.env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]

    def _spawn(self, label: str, argv: list[str]) -> None:
        out = open(self.logdir / f"{label}.stdout", "ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.root,
            start_new_session=True,  # our Ctrl-C / test signals do not reach the daemons
        )
        out.close()
        self.procs[label] = proc
        self.pids[label] = proc.pid

    def _check_alive(self) -> None:
        dead = {k: p.returncode for k, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise ClusterError(f"daemon(s) exited early: {dead}\n{self.logs()}")

    def start(self, timeout: float = 90.0) -> "SlurmCluster":
        """Start munged, slurmctld and one slurmd per node; wait until all nodes are idle."""
        if os.geteuid() != 0:
            raise ClusterUnavailable(
                f"the throwaway SLURM cluster runs SlurmUser=root and slurmd must launch job "
                f"steps as root; this process runs as uid {os.geteuid()}"
            )
        ensure_binaries()
        self._write_files()
        try:
            m = self.root / "munge"
            self._spawn("munged", [
                _which("munged"), "--foreground", f"--socket={self.munge_socket}",
                f"--key-file={self.root}/munge-key/munge.key", f"--pid-file={m}/munged.pid",
                f"--log-file={self.logdir}/munged.log", f"--seed-file={self.root}/munge-key/munged.seed",
                "--num-threads=4",
            ])
            self._wait(lambda: self.munge_socket.exists(), 20, "munged socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0
                       and "UP" in self.run(["scontrol", "ping"], check=False).stdout, 30, "slurmctld ping")
            for n in self.nodes:
                self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
            self._wait(self._all_idle, timeout, "all nodes idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _all_idle(self) -> bool:
        p = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        states = dict(line.split()[:2] for line in p.stdout.splitlines() if len(line.split()) >= 2)
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if cond():
                return
            time.sleep(0.5)
        sinfo = self.run(["sinfo", "-N", "-l"], check=False)
        raise ClusterError(
            f"timed out after {timeout:.0f} s waiting for {what}\n"
            f"sinfo:\n{sinfo.stdout}{sinfo.stderr}\n{self.logs()}"
        )

    # --------------------------------------------------------------- teardown
    def stop(self, grace_s: float = 15.0) -> None:
        """Cancel this cluster's jobs, then stop every daemon we started by PID."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                jobs = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=20).stdout.split()
                if jobs:
                    self.run(["scancel", *jobs], check=False, timeout=20)
                    deadline = time.monotonic() + self.kill_wait_s + 20
                    while time.monotonic() < deadline:
                        if not self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=20).stdout.split():
                            break
                        time.sleep(1)
            except (subprocess.TimeoutExpired, OSError):
                pass
        # slurmds first, then the controller (it stops its own slurmscriptd helper), then munge.
        order = [k for k in self.procs if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        for label in order:
            proc = self.procs.get(label)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        # Job steps outlive slurmd; any still running (a job that did not end in time) go now.
        self._kill_leftovers()
        self.procs.clear()

    def _leftover_pids(self) -> list[int]:
        """PIDs of processes still running for THIS cluster once its daemons are stopped.

        Our daemons run with SLURM_CONF=<our conf> in their environment and pass it on to what
        they start (slurmstepd, slurmctld's slurmscriptd), and SLURM exports SLURM_CONF into
        every job, so matching it finds exactly the processes this cluster started (job steps
        left behind), never anything else on the machine.
        """
        needle = f"SLURM_CONF={self.conf}".encode()
        daemons = {p.pid for p in self.procs.values()}
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            pid = int(d.name)
            if pid == os.getpid() or pid in daemons:
                continue
            try:
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                found.append(pid)
        return found

    def _kill_leftovers(self) -> None:
        pids = self._leftover_pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if Path(f"/proc/{p}").exists()
                        and "Z" not in _proc_state(p)]
                time.sleep(0.2)
            if not pids:
                return

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ usage
    def run(self, cmd: str | Sequence[str], check: bool = True, timeout: float = 60,
            env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
            ) -> subprocess.CompletedProcess:
        """Run a client command against this cluster (a string runs through bash)."""
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full_env = {**self.env, **(env or {})}
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env,
                           cwd=str(cwd) if cwd else None)
        if check and p.returncode != 0:
            shown = cmd if isinstance(cmd, str) else shlex.join(argv)
            raise ClusterError(
                f"command failed with status {p.returncode}: {shown}\n"
                f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"
            )
        return p

    def sbatch(self, args: Sequence[str], env: Mapping[str, str] | None = None,
               cwd: str | Path | None = None) -> int:
        """Submit with ``sbatch --parsable`` and return the job id."""
        p = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict ({} once the record is gone)."""
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return parse_scontrol(p.stdout) if p.returncode == 0 else {}

    def array_jobs(self, array_job_id: int | str) -> list[dict[str, str]]:
        """One dict per task of an array job."""
        p = self.run(["scontrol", "show", "job", "-o", str(array_job_id)], check=False)
        return [parse_scontrol(line) for line in p.stdout.splitlines() if line.strip()]

    FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                    "BOOT_FAIL", "DEADLINE", "PREEMPTED")

    def release_requeued(self, info: Mapping[str, str]) -> bool:
        """Start a requeued job now instead of after SLURM's requeue delay.

        slurmctld gives a requeued job a begin time about two minutes in the future
        (Reason=BeginTime); on a real cluster that is harmless, in tests it is dead time.
        Not ``StartTime=now``: a job restarted within the same second as its requeue fails
        with "Job credential revoked" (the revocation of the old run's credential is
        compared at one-second resolution), so it starts a few seconds later. Done once per
        (job, restart count), or each poll would push the begin time further out.
        """
        restarts = int(info.get("Restarts", "0") or 0)
        key = (info.get("JobId"), restarts)
        if (info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime"
                and restarts > 0 and key not in self._released):
            self._released.add(key)
            self.run(["scontrol", "update", f"JobId={info['JobId']}", "StartTime=now+3"], check=False)
            return True
        return False

    def wait_job(self, job_id: int | str, states: Sequence[str] = FINAL_STATES,
                 timeout: float = 120, skip_requeue_delay: bool = True) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; return its record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if skip_requeue_delay:
                self.release_requeued(info)
            time.sleep(0.5)
        raise ClusterError(f"job {job_id} not in {tuple(states)} after {timeout:.0f} s: {info}\n{self.logs()}")

    def logs(self, tail_chars: int = 3000) -> str:
        """The tails of every daemon log, for error messages."""
        parts = []
        for f in sorted(self.logdir.glob("*")):
            try:
                text = f.read_text(errors="replace")
            except OSError as e:
                text = f"<unreadable: {e}>"
            parts.append(f"----- {f.name} (last {tail_chars} chars) -----\n{text[-tail_chars:]}")
        return "\n".join(parts)


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="state directory (default: a new temporary directory)")
    args = ap.parse_args()
    cluster = SlurmCluster(args.dir)
    cluster.start()
    print(f"cluster up in {cluster.root}; daemon PIDs {cluster.pids}")
    print(f"use it with:  export SLURM_CONF={cluster.conf}")
    print("Ctrl-C (or SIGTERM to this process) stops it.")
    stop = {"now": False}

    def _handler(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    try:
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        cluster.stop()
        print("cluster stopped")


if __name__ == "__main__":
    _main()
