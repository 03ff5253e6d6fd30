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
