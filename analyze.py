"""
Post-run analysis and bookkeeping of the experiment store (fixed harness: the agent never edits it).

    uv run analyze.py                 archive the run in the working directory, judge it,
                                      analysis.md
    uv run analyze.py keep [RUN_ID]   mark the (latest) run keep; rewrite insights.md's Current Best
    uv run analyze.py discard [RUN_ID]  mark it discard; restore train.py to the best with a commit
    uv run analyze.py compare A B     two archived runs side by side
    uv run analyze.py status          current best, latest runs, noise estimate, counts
    uv run analyze.py report          the morning report: .auto-log-research/report.html
    uv run analyze.py sync            start from the store's best (another worker may have kept one)
    uv run analyze.py claim "IDEA"    claim an idea of ideas_queue.md; `claims` lists them all
    uv run analyze.py reseal          accept a ledger edited by hand as it now is (see README)

It never reports a number a run did not produce: a run without its own summary is a crash, whatever
files are lying around; a finished run whose harness, data or clock does not check out is archived
as invalid, never kept or counted. This file is the command line; the analysis/ package does the
work. No torch import: analysis takes seconds. A ledger edited by hand (analysis/store.py's chain)
stops every command: `status` and `report` show a red banner naming its first broken row instead of
numbers, and the others refuse with one line. In a boxed night (supervise.py) every command the
agent gives runs in the night's runner, outside its box (harness/nightrun.py): the store is
read-only in the box but for its notes folder.
"""

import argparse
import os
import sys

from harness import fixed, git, nightrun, settings
from harness.contract import PRIVATE_UMASK, TRAIN_COMMAND, HarnessError
from analysis import (archive, bookkeeping, claims, confirmation, pairing, plots, report,
                      verdict)
from analysis.store import COMPARE_DIR, IDEAS, LedgerError, Store

STATUS_LAST_N = 10            # runs listed by `analyze.py status`
# the commands that judge a run: refused while the integrity check itself differs from the store's
# first run's commit (the other fixed files make a run invalid instead)
JUDGING_COMMANDS = (None, "keep")


def refuse_changed_checker(store: Store):
    """Compare the checker's own files (fixed.CHECKER_FILES) with the store's first finished
    run's commit before anything is judged: a `return []` committed into the integrity check would
    otherwise pass it. Circular all the same: an edit of analyze.py or harness/fixed.py removes
    this call (README, "Integrity"); the night's supervisor watches those from outside."""
    commit = fixed.first_run_commit(store.root)  # read without analysis/, which it checks
    if not commit or not git.is_repo(store.root):
        return
    problems = fixed.checker_problems(store.root, commit)
    if problems:
        more = f" (and {len(problems) - 1} more checker file(s))" if len(problems) > 1 else ""
        raise HarnessError(problems[0] + more)


def keep_policy(store: Store) -> tuple:
    """(the keep policy of this call, notes): the running night's, fixed when it started, else
    $AUTORESEARCH_VERDICT's (the default when unset). The agent cannot change a night's policy."""
    night = store.night()
    if night is None or night.get("verdict") not in verdict.POLICIES:
        return settings.VERDICT or verdict.VERDICT_MODE, []
    notes = []
    if settings.VERDICT not in (None, night["verdict"]):
        notes.append(f"note: {settings.VERDICT_ENV}={settings.VERDICT} is ignored: the night "
                     f"running here (supervise.py pid {night['pid']}) fixed the keep policy "
                     f"{night['verdict']} when it started")
    return night["verdict"], notes


def cmd_analyze(args, lines: list):
    store = Store(".")
    mode, notes = keep_policy(store)
    lines += notes
    context, path = archive.analyze(store, args.run_dir, mode, lines, args.message)
    lines += report.stdout_lines(context, path)


def cmd_keep(args, lines: list):
    bookkeeping.keep(lines, args.run_id, args.new_baseline)


def cmd_discard(args, lines: list):
    bookkeeping.discard(lines, args.run_id)


def cmd_sync(args, lines: list):
    bookkeeping.sync(lines)


def cmd_claim(args, lines: list):
    bookkeeping.claim(lines, " ".join(args.idea))


def cmd_claims(args, lines: list):
    """Every idea of ideas_queue.md with its claim: free, claimed by a live worker, or tested."""
    store = Store(".")
    queue = store.note(IDEAS)
    lines.append(claims.listing(claims.read(store), queue.read_text() if queue.exists() else "",
                                claims.alive_in(store)))


def cmd_compare(args, lines: list):
    store = Store(".")
    ledger = store.read_ledger()
    a, b = store.find(ledger, args.a), store.find(ledger, args.b)
    ra, rb = store.archived_records(a["run_id"]), store.archived_records(b["run_id"])
    traj = archive.trajectory(ra, a.get("config") or {}, rb)
    out_dir = store.path(COMPARE_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{a['run_id']}_vs_{b['run_id']}.png"
    plots.render([(path, plots.line_figure,
                   (plots.PLOTS[0], [(a["run_id"], ra), (b["run_id"], rb)]))])
    diff = archive.config_diff(b.get("config") or {}, a.get("config") or {})
    lines.append(report.compare_md(a, b, diff, traj, path))


def cmd_status(args, lines: list):
    """The store's state; a broken ledger's banner instead (exit status 1)."""
    store = Store(".")
    try:
        ledger = store.read_ledger()
    except LedgerError as e:
        lines.append(report.ledger_banner(e, sys.stdout.isatty()))
        return 1
    lines += report.reseal_lines(store.reseals())
    if not ledger:
        lines.append(f"no runs yet: `{TRAIN_COMMAND} && uv run analyze.py`")
        return
    comparable = verdict.store_comparable(ledger)
    groups = verdict.pools(ledger, comparable)
    noise = verdict.noise_estimate([[r["val_bpb"] for r in g] for g in groups.values()])
    best = verdict.best_pool(ledger, comparable)
    mode, notes = keep_policy(store)
    live = [c for c in claims.read(store) if claims.is_live(c, claims.alive_in(store))]
    lines += notes
    tampering = store.path(fixed.TAMPERING_FILE)
    if tampering.exists():  # what a night's supervisor found, first: it ended that night
        lines += tampering.read_text().splitlines()
    share = pairing.store_share(groups, best[0] if best else None,
                                noise["sigma"] if noise["trusted"] else None)
    lines.append(report.status_text(ledger, best[1] if best else None, noise, store.orphans(ledger),
                                    args.n, mode, live, share, confirmation.load(store)))


def cmd_report(args, lines: list):
    """Write report.html from the store as it is now. Reads only (no lock): the ledger and every
    archive file are replaced atomically, so a report shows the store before or after an
    analysis."""
    from jinja2 import TemplateError

    from analysis import html_report  # jinja2 and markdown-it are imported by this command only
    store = Store(".")
    try:
        path, broken, shown = html_report.write(store, args.night)
    except TemplateError as e:  # a damaged analysis/templates/: one line, as every refusal
        raise HarnessError(f"the report template {html_report.TEMPLATE_DIR / html_report.TEMPLATE} "
                           f"is broken ({type(e).__name__}: {e}); restore it with `git checkout "
                           f"analysis/templates`") from None
    if broken is not None:
        lines.append(f"wrote {path}: a red banner only, the ledger is broken; open "
                     f"file://{path.resolve()}")
        raise broken
    lines.append(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB, {shown}): open "
                 f"file://{path.resolve()}")


def cmd_reseal(args, lines: list):
    """Accept a ledger that no longer chains, as it now is, once a person has checked it."""
    if settings.NIGHT:
        raise HarnessError("reseal is the human's command, after checking the ledger by hand: "
                           "a night's agent cannot give it")
    store = Store(".")
    with store.lock():
        rows, broken = store.reseal()
    if broken is None:
        lines.append("the ledger chains: nothing to reseal")
        return
    lines.append(f"resealed {len(rows)} row(s) as they are now; it was broken: {broken}")
    lines.append("note: `analyze.py status` says so from now on")


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (`status -n`)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


class OneLineErrors(argparse.ArgumentParser):
    """A usage error is one `error:` line, as every other refusal of analyze.py (exit 2)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see `uv run {self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    top = OneLineErrors(prog="analyze.py", description=__doc__.split("\n\n")[0].strip())
    top.add_argument("--run-dir", default=".",
                     help="where train.py wrote its files (default: here)")
    top.add_argument("-m", "--message",
                     help="description for results.tsv (default: the commit's subject)")
    sub = top.add_subparsers(dest="command")
    keep = sub.add_parser("keep", help="mark a run keep and update insights.md's Current Best")
    keep.add_argument("run_id", nargs="?", help="default: this worker's latest run")
    keep.add_argument("--new-baseline", action="store_true",
                      help="keep a run that no kept run is comparable with (new device, budget, "
                           "harness, data or torch)")
    discard = sub.add_parser("discard", help="mark a run discard and restore train.py to the best")
    discard.add_argument("run_id", nargs="?", help="default: this worker's latest run")
    compare = sub.add_parser("compare", help="two archived runs side by side")
    compare.add_argument("a")
    compare.add_argument("b")
    status = sub.add_parser("status", help="best, latest runs, noise, counts")
    status.add_argument("-n", type=positive_int, default=STATUS_LAST_N,
                        help="how many latest runs to list")
    report = sub.add_parser("report", help="write the morning report .auto-log-research/"
                                           "report.html (the last night in full, the earlier "
                                           "ones a line each)")
    report.add_argument("--night", type=positive_int,
                        help="show night N (1 = the store's first) in full instead, in "
                             "report-night-N.html beside report.html")
    sub.add_parser("sync", help="start from the store's best: commit its train.py where it differs")
    claim = sub.add_parser("claim", help="claim an idea of ideas_queue.md for this worker (refused "
                                         "if taken or tested)")
    claim.add_argument("idea", nargs="+", help="the idea's line of ideas_queue.md")
    sub.add_parser("claims",
                   help="the ideas of ideas_queue.md: free, claimed by a worker, or tested")
    sub.add_parser("reseal", help="accept a ledger edited by hand as it now is, after checking it "
                                  "(status notes it from then on)")
    return top


COMMANDS = {None: cmd_analyze, "keep": cmd_keep, "discard": cmd_discard, "compare": cmd_compare,
            "status": cmd_status, "report": cmd_report, "sync": cmd_sync, "claim": cmd_claim,
            "claims": cmd_claims, "reseal": cmd_reseal}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if settings.RUN_SOCKET:  # in a boxed night's agent box: the night's runner writes the store
        return nightrun.ask("analyze.py", argv, settings.RUN_SOCKET)
    os.umask(PRIVATE_UMASK)  # the store, its ledger and reports: this user's only
    lines = []
    try:
        if args.command in JUDGING_COMMANDS:
            refuse_changed_checker(Store("."))
        rc = COMMANDS[args.command](args, lines) or 0
    except HarnessError as e:
        print("\n".join(lines + [""]), end="")
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk or a permission, outside the archiving (which says more)
        print("\n".join(lines + [""]), end="")
        print(f"error: {e.filename or 'a file'}: {e.strerror or e}; fix that (free space, "
              f"permissions) and run the command again", file=sys.stderr)
        return 1
    print("\n".join(lines + [""]), end="")
    return rc


if __name__ == "__main__":
    sys.exit(main())
