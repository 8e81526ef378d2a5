"""
A git repository holding the loop, as a user's checkout does, and the commands a test runs in it as
the agent would (analyze.py, git), with synthetic runs written the way train.py writes them.
"""

import os
import subprocess
import sys
from pathlib import Path

import synthetic
from analysis.store import Store

HARNESS = synthetic.HARNESS_COPY
GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
CRASH_LOG = """step 00010 (3.0%) | loss: 5.1
Traceback (most recent call last):
  File "train.py", line 400, in <module>
    loss = compiled(x, y)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
nanobind: leaked 3 instances!
"""  # output after the traceback (exit-time warnings) is not the error


def git(repo, *args) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout


def analyze(repo, *args):
    return subprocess.run([sys.executable, "analyze.py", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}, timeout=120)


def head(repo) -> str:
    return git(repo, "rev-parse", "--short", "HEAD").strip()


def train_sha(repo) -> str:
    import hashlib
    return hashlib.sha256((repo / "train.py").read_bytes()).hexdigest()


def make_repo(folder, files=HARNESS):
    """A git repository in `folder` with copies of the project's `files` and analysis/, committed as "baseline"."""
    folder.mkdir(exist_ok=True)
    synthetic.copy_harness(folder, files)
    (folder / ".gitignore").write_text(".auto-log-research/\nrun.log\nmetrics.jsonl\nrun_summary.json\n__pycache__/\n")
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    git(folder, "commit", "-qm", "baseline")
    return folder


def fake_run(repo, val_bpb=1.0, seed=42, status="ok", log=None, n_steps=300, offset=None, **kw):
    """Write the files of a finished run of the committed train.py, as train.py would."""
    records = synthetic.make_records(n_steps=n_steps, seed=seed, offset=offset)
    summary = synthetic.make_summary(records, val_bpb, commit=head(repo), train_sha256=train_sha(repo), seed=seed,
                                     status=status, **kw)
    synthetic.write_run(repo, records, summary, log if log is not None else f"run seed {seed}\nval_bpb: {val_bpb}\n")
    return records, summary


def commit_change(repo, old, new, message):
    source = (repo / "train.py").read_text()
    assert old in source
    (repo / "train.py").write_text(source.replace(old, new, 1))
    git(repo, "commit", "-qam", message)


def ledger(repo):
    return Store(repo).read_ledger()


def baseline(repo, values=(1.0, 1.002, 0.998)):
    """The baseline run three times with different seeds, kept."""
    for i, v in enumerate(values):
        fake_run(repo, v, seed=42 + i)
        assert analyze(repo).returncode == 0
    assert analyze(repo, "keep").returncode == 0


def night_repo(folder: Path) -> Path:
    """A repository of the loop as a user's clone holds it (the project's .gitignore), committed."""
    folder.mkdir()
    synthetic.copy_harness(folder, synthetic.HARNESS_COPY + ("supervise.py", "program.md", ".gitignore"))
    git(folder, "init", "-q", "-b", "main")
    git(folder, "add", "-A")
    git(folder, "commit", "-qm", "baseline")
    return folder
