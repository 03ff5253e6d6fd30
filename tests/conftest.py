import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Under pytest-xdist the workers share the machine: each worker, and every process it starts (the
# trainer keeps an OMP_NUM_THREADS it is given), gets its share of the cores. Without this, two
# workers each running a 2-rank job put 8 busy threads on 2 cores. Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("OMP_NUM_THREADS"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // max(1, _workers)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (CI still runs it)")
    config.addinivalue_line("markers", "multiproc: starts other processes (a training run, gloo ranks, a CLI, "
                                       "a SLURM cluster); `make test-fast` leaves these out (docs/testing.md)")


# What marks a test `multiproc` without a mark of its own: a fixture that trains or prepares data in
# other processes, or a call that starts processes, in the test's own body or in a function or
# fixture of its file that the test calls or uses (followed through the file's own functions).
# A helper imported from elsewhere is not read: a test that starts processes only through one needs
# @pytest.mark.multiproc.
MULTIPROC_FIXTURES = {"small_corpus", "tc_run", "two_runs", "slurm_cluster"}
MULTIPROC_CALLS = ("run_distributed(", "launch(", "start_run(", "Run(", "Run.env(", "Run.deepspeed(", "start(",
                   "run_killing_group(", "subprocess.", "mp.spawn(", "mpiexec", "train.py", "cli(",
                   "run_main(", "run(")
_STARTERS = {}   # module file -> names of its top-level functions that start processes


def _starters(path: str) -> set:
    """Top-level functions (fixtures too) of a test file that start processes, directly or
    through one another."""
    if path not in _STARTERS:
        import ast
        try:
            source = open(path).read()
            bodies = {node.name: ast.get_source_segment(source, node) or ""
                      for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
        except (OSError, SyntaxError):
            bodies = {}
        found = {name for name, body in bodies.items() if any(call in body for call in MULTIPROC_CALLS)}
        grew = True
        while grew:   # helpers of helpers
            more = {name for name, body in bodies.items() if name not in found
                    and any(f"{other}(" in body or f"{other}," in body or f"{other})" in body for other in found)}
            found |= more
            grew = bool(more)
        _STARTERS[path] = found
    return _STARTERS[path]


def _starts_processes(item) -> bool:
    if item.get_closest_marker("multiproc") or item.get_closest_marker("slow"):
        return True
    fixtures = set(getattr(item, "fixturenames", ()))
    if MULTIPROC_FIXTURES & fixtures:
        return True
    fn = getattr(item, "function", None)
    try:
        import inspect
        body = inspect.getsource(fn) if fn is not None else ""
    except (OSError, TypeError):
        return True   # unreadable: assume the slower lane
    if any(call in body for call in MULTIPROC_CALLS):
        return True
    starters = _starters(str(item.fspath))
    return bool(starters & fixtures) or any(f"{name}(" in body for name in starters)


# Under pytest-xdist (`make test`: -n 2 --dist loadgroup) a group runs on one worker, so that a
# fixture is built once: a file's tests share a group (module-scoped fixtures train too), and the
# files that use the same session-wide run (SHARED_RUNS) share one.
SHARED_RUNS = ("two_runs", "tc_run", "slurm_cluster")


def _groups(items) -> dict:
    """{file: group name}: files joined through the shared runs they use (union-find)."""
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    for item in items:
        path = item.nodeid.split("::")[0]
        for name in SHARED_RUNS:
            if name in getattr(item, "fixturenames", ()):
                a, b = find(path), find(name)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return {item.nodeid.split("::")[0]: find(item.nodeid.split("::")[0]) for item in items}


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook, which reads xdist_group into the node ids
def pytest_collection_modifyitems(config, items):
    groups = _groups(items)
    for item in items:
        if _starts_processes(item):
            item.add_marker(pytest.mark.multiproc)
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid.split("::")[0]]))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A small prepared corpus from the stdlib (no download), shared by the trainer tests."""
    import subprocess
    out = tmp_path_factory.mktemp("data") / "stdlib"
    subprocess.run([sys.executable, "-m", "trainer.data", "prepare", "--out", str(out), "--max-docs", "150",
                    "--vocab-size", "1024", "--num-workers", "2"], cwd=ROOT, check=True, capture_output=True)
    return out


TC_BIAS = {"moe.router": "token_choice", "moe.capacity.schedule": "static", "moe.bias_update_rate": 0.01,
           "moe.aux_loss_coef": 0.0}


@pytest.fixture(scope="session")
def tc_run(small_corpus, tmp_path_factory):
    """A token-choice run with aux-loss-free balancing (non-zero expert biases), 24 steps: the
    source of the retrofit tests (tests/trainer/test_init_from.py, test_retrofit_demo.py)."""
    from tests.evaluation.conftest import start_run
    run_dir = tmp_path_factory.mktemp("tc") / "tc"
    p = start_run(small_corpus, run_dir, **TC_BIAS)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-6000:]
    return run_dir



_UNGROUPED = []   # set in a worker whose loadgroup grouping did not take


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Under `--dist loadgroup`, pytest-xdist's worker writes each test's group into its node id
    (`name@group`), and the controller sends a group to one worker. When that write does not take
    (pytest-xdist against a pytest whose node ids it cannot set), tests of one file run on both
    workers and each builds the file's module-scoped runs: the suite passes, twice as slowly.
    Every test then fails at setup, saying why."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    _UNGROUPED.extend(item.nodeid for item in session.items
                      if item.get_closest_marker("xdist_group") and "@" not in item.nodeid)


def pytest_runtest_setup(item):
    if _UNGROUPED:
        import _pytest
        import xdist
        pytest.fail(f"--dist loadgroup: {len(_UNGROUPED)} tests carry an xdist_group mark but pytest-xdist "
                    f"{xdist.__version__} did not put it in their node ids under pytest {_pytest.__version__}, "
                    f"so one file's tests would run on both workers (first: {_UNGROUPED[0]}); install the "
                    f"versions requirements.txt pins", pytrace=False)
