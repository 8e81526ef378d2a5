"""
The night's watch over the fixed files: a checker the agent's edits cannot switch off.

The supervisor starts before the agent runs anything. At the start it hashes every fixed file
(harness/fixed.py) and every startup hook of the virtual environment it runs in (.pth files,
sitecustomize.py, usercustomize.py: code every later `uv run` executes before the harness), and
keeps the hashes in its own memory. It hashes again at every check of the night; a difference
stops the night at once, with one line naming the file, kept in the store's fixed.TAMPERING_FILE for
the morning. No file the agent can edit (analyze.py, analysis/integrity.py) runs in this check;
a process of the same user can still defeat it (README, "Integrity").
"""

import site
import sysconfig

from harness import fixed

WHAT = {"changed": "was changed", "missing": "was removed", "new": "appeared"}


def site_dirs() -> list:
    """The site-packages folders of this interpreter (the night's virtual environment, under
    `uv run`), and the user's own where this interpreter reads it."""
    paths = sysconfig.get_paths()
    dirs = list(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    return dirs + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])


class FixedWatch:
    """The snapshot of a night's start and the comparison with now."""

    def __init__(self, repo, dirs=None):
        self.repo, self.dirs = repo, site_dirs() if dirs is None else dirs
        self.start = fixed.snapshot(repo, self.dirs)

    def changes(self) -> list:
        """One line per file that differs from the night's start, naming it; empty when none."""
        now = fixed.snapshot(self.repo, self.dirs)
        return [f"{path} {WHAT[what]} since the night started: the harness, the analysis, the "
                f"night and the environment's startup hooks are off limits; the night is stopped, "
                f"its last run is not settled; review `git log -p` and the file"
                for path, what in fixed.snapshot_changes(self.start, now)]
