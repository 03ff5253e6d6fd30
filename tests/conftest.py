import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (CI still runs it)")


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
