"""The test lanes of docs/testing.md: the commands `make test` and `make test-fast` run, which tests
the fast lane leaves out, and the xdist groups that keep a shared run on one worker."""
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.multiproc   # make and a collecting pytest, in other processes


def _make_n(target: str) -> str:
    out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_targets_run_the_documented_commands():
    assert re.search(r"-m pytest tests -n 2 --dist loadgroup --durations=30$", _make_n("test"), re.M)
    assert re.search(r'-m pytest tests -m "not multiproc" --durations=30$', _make_n("test-fast"), re.M)
    assert " train.py --ds_config" in _make_n("train")   # ENTRY, read from trainer/launch.py


def _collect(*args) -> dict:
    """{test id: set of marker names} of a collection, via a plugin run in a fresh pytest."""
    code = ("import json, sys, pytest\n"
            "class P:\n"
            "    def pytest_collection_finish(self, session):\n"
            "        self.items = {i.nodeid: [[m.name, list(m.args)] for m in i.iter_markers()] for i in session.items}\n"
            "p = P()\n"
            "pytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider', *sys.argv[1:]], plugins=[p])\n"
            "print('ITEMS' + json.dumps(p.items))\n")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ITEMS"))
    return json.loads(line[len("ITEMS"):])


FILES = ["tests/model/test_routing.py", "tests/faults/test_bad_input.py", "tests/faults/test_hang.py",
         "tests/trainer/test_launch.py", "tests/trainer/test_init_from.py", "tests/trainer/test_retrofit_demo.py",
         "tests/evaluation/test_perplexity.py", "tests/evaluation/test_report.py", "tests/trainer/test_reshard.py",
         "tests/model/test_layer.py", "tests/trainer/test_step_stats.py"]


@pytest.fixture(scope="module")
def collected():
    return _collect(*FILES)


def test_fast_lane_leaves_out_every_test_that_starts_processes(collected):
    """`-m "not multiproc"` keeps the tests without the mark; which ones carry it:"""
    fast = {t for t, marks in collected.items() if not any(name == "multiproc" for name, _ in marks)}
    assert any(t.startswith("tests/model/test_routing.py::") for t in fast)
    # in-process checks of the same file stay in the fast lane
    assert any(t.startswith("tests/faults/test_bad_input.py::test_overrides_read_numbers") for t in fast)
    for test in ("tests/faults/test_bad_input.py::test_corrupt_meta_json",             # a launched run
                 "tests/faults/test_hang.py::test_stopped_rank_ends_the_job_with_stacks_and_resume_continues",
                 "tests/trainer/test_launch.py::test_a_timeout_kills_every_process_of_the_group",   # start(
                 "tests/trainer/test_init_from.py::test_a_launched_retrofit_starts_from_the_tc_weights"):
        assert test in collected and test not in fast, test
    # through a helper of the test's file (check_expert_parallel) or a fixture of it (reduced)
    for prefix in ("tests/model/test_layer.py::test_expert_parallel_over_4_ranks_equals_single_process",
                   "tests/trainer/test_step_stats.py::test_two_ranks_agree"):
        tests = [t for t in collected if t.startswith(prefix)]
        assert tests and not set(tests) & fast, prefix
    assert any(t.startswith("tests/model/test_layer.py::test_gradcheck_float64") for t in fast)


def test_tests_sharing_a_run_share_an_xdist_group(collected):
    def groups(prefix):
        return {args[0] for t, marks in collected.items() if t.startswith(prefix)
                for name, args in marks if name == "xdist_group"}

    tc = groups("tests/trainer/test_init_from.py") | groups("tests/trainer/test_retrofit_demo.py")
    assert len(tc) == 1, tc   # both use tc_run: one group, so it is trained once
    runs = groups("tests/evaluation/test_perplexity.py") | groups("tests/evaluation/test_report.py")
    assert len(runs) == 1 and runs != tc, runs   # both use two_runs
    assert groups("tests/trainer/test_reshard.py") == {"tests/trainer/test_reshard.py"}   # its module fixture
