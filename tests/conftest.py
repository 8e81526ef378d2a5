"""
Shared fixtures. Every test is hermetic: the prepare cache lives in a temporary directory, the data
URL points at a closed local port (nothing is ever downloaded from the internet), and the prepared
corpus is the offline smoke-test corpus with a small vocabulary so CPU runs stay fast.
"""

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Must happen before the harness is imported anywhere: harness/settings.py reads the environment at import.
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="alr-test-cache-"))
os.environ["AUTORESEARCH_CACHE"] = str(SESSION_CACHE)
os.environ["AUTORESEARCH_DATA_URL"] = "http://127.0.0.1:9"  # discard port: refused at once

from harness import data as harness_data, settings, tokenizer as harness_tokenizer  # noqa: E402
from train_defs import load_train_definitions  # noqa: E402

TEST_VOCAB = 1024  # small vocabulary: fast to train, small embedding tables for CPU smoke runs


@pytest.fixture(scope="session")
def prepared():
    """The session cache, prepared once from the offline corpus; returns its manifest."""
    return harness_data.prepare("offline", vocab_size=TEST_VOCAB)


@pytest.fixture(scope="session")
def tokenizer(prepared):
    return harness_tokenizer.Tokenizer.from_directory()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point the harness's in-process cache (settings.CACHE_DIR) at an empty one of this test's own."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(settings, "CACHE_DIR", cache)
    cache.mkdir()
    return cache


@contextlib.contextmanager
def synthetic_accepted():
    """Accept the seals of runs written by tests/synthetic.py, which never trained, in this process
    and in the scripts it starts (AUTORESEARCH_ACCEPT_SYNTHETIC=1), until the block ends."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(settings.ACCEPT_SYNTHETIC_ENV, "1")
        patch.setattr(settings, "ACCEPT_SYNTHETIC", True)
        yield


@pytest.fixture
def accept_synthetic():
    """This test analyses synthetic runs: synthetic_accepted() for its length."""
    with synthetic_accepted():
        yield


def run_script(args, cwd, env_extra=None, timeout=600, umask=-1):
    """Run a repository script with the test interpreter (and `umask`, -1: this process's);
    returns CompletedProcess (text)."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, umask=umask)


@pytest.fixture(scope="session")
def train_defs():
    return load_train_definitions()


@pytest.fixture
def repo(tmp_path):
    """A git repository holding the loop (tests/repos.py), its harness committed as "baseline"."""
    from repos import make_repo
    return make_repo(tmp_path)


@pytest.fixture
def in_process_run(prepared, tmp_path):
    """The harness's record of a run (harness/runlog.py Run) made in this process, in tmp_path, with
    what it installs for a real train.py process (the excepthook, the SIGTERM handler, the watchdog)
    undone, so that the test process is left as it was."""
    import signal

    from harness import runlog
    hook, handler = sys.excepthook, signal.getsignal(signal.SIGTERM)
    run = runlog.Run({}, run_dir=tmp_path)
    sys.excepthook = hook
    signal.signal(signal.SIGTERM, handler)
    run.watchdog.stop()
    return run
