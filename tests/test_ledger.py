"""The ledger's chain and its row checks (issue 19, "Editing the ledger"), attacked for real: a ledger
written by real analyze.py commands, then edited by hand as an attacker or a slip would (a forged
best, a removed, moved or stripped row, a wrong type); every command then names the first broken row
in one line (status and report.html as a red banner), never a traceback, never a forged number, and
`reseal` is the way back."""

import json
import shutil

import pytest

import synthetic
from analysis.store import CHAIN_FIELD, HEAD_FILE, RUNS_JSONL
from conftest import synthetic_accepted
from repos import analyze, baseline, commit_change, fake_run, ledger, make_repo

# these tests analyse runs written by tests/synthetic.py, which never trained
pytestmark = pytest.mark.usefixtures("accept_synthetic")

STORE = ".auto-log-research"
BANNER = "!!! LEDGER BROKEN, no numbers shown !!!"
FORGED_BPB = 0.25             # the attacker's number: better than any honest run here
COMMANDS = (("status",), ("report",), ("keep",), ("discard",), ("compare", "A", "B"), ())


@pytest.fixture(scope="module")
def built(tmp_path_factory, prepared):
    """A repository whose ledger real commands wrote, built once for this file (each test edits a
    copy): a kept baseline of three runs, then an invalid run (its summary claims twice its
    steps' time)."""
    with synthetic_accepted():
        repo = make_repo(tmp_path_factory.mktemp("built") / "repo")
        baseline(repo)
        records, summary = fake_run(repo, 0.5, seed=5)
        synthetic.write_run(repo, records, {**summary, "training_seconds": 2 * summary["training_seconds"]},
                            "log\n")
        assert analyze(repo).returncode == 0 and ledger(repo)[-1]["status"] == "invalid"
        return repo


@pytest.fixture
def invalid_repo(built, tmp_path):
    """A copy of `built`, this test's own."""
    return shutil.copytree(built, tmp_path / "repo", symlinks=True)


@pytest.fixture
def store_repo(invalid_repo):
    """invalid_repo's ledger, then a worse run of new code."""
    commit_change(invalid_repo, "DEPTH = 8 ", "DEPTH = 12 ", "depth 12")
    fake_run(invalid_repo, 1.05, seed=9)
    assert analyze(invalid_repo).returncode == 0
    return invalid_repo


def lines_of(repo) -> list:
    return (repo / STORE / RUNS_JSONL).read_text().splitlines()


def write_lines(repo, lines: list):
    """The attacker's edit: runs.jsonl rewritten by hand."""
    (repo / STORE / RUNS_JSONL).write_text("".join(line + "\n" for line in lines))


def edited(line: str, **changes) -> str:
    """A row's line with `changes` made by hand (None: the field removed), as an editor saves it."""
    row = json.loads(line)
    row.update(changes)
    return json.dumps({k: v for k, v in row.items() if v is not None}, sort_keys=True)


def refused(proc, where: str) -> str:
    """The one `error:` line of a command refused for the broken ledger (exit 1), naming `where`."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and where in errors[0], proc.stderr
    return errors[0]


def assert_banner(repo, where: str, absent: str):
    """status and report.html name the first broken row (`where`) in a banner, and show no numbers
    (`absent` nowhere)."""
    status = analyze(repo, "status")
    assert status.returncode == 1 and "Traceback" not in status.stdout + status.stderr, status.stderr
    assert status.stdout.startswith(BANNER) and where in status.stdout, status.stdout
    assert absent not in status.stdout and "best:" not in status.stdout
    report = analyze(repo, "report")
    refused(report, where)
    html = (repo / STORE / "report.html").read_text()
    banner = html.split('<section id="ledger-broken" role="alert">', 1)[1].split("</section>", 1)[0]
    assert where in banner and absent not in html and "LEDGER BROKEN" in banner


@pytest.mark.parametrize("last", [False, True], ids=["a middle row", "the last row"])
def test_an_invalid_run_forged_into_the_best_is_named_never_shown_or_judged_against(invalid_repo,
                                                                                    last):
    repo = invalid_repo
    if not last:  # a later run chains after the forged row
        commit_change(repo, "DEPTH = 8 ", "DEPTH = 12 ", "depth 12")
        fake_run(repo, 1.05, seed=9)
        assert analyze(repo).returncode == 0
    rows = ledger(repo)
    lines = lines_of(repo)
    i = next(n for n, r in enumerate(rows) if r["status"] == "invalid")
    lines[i] = edited(lines[i], status="keep", val_bpb=FORGED_BPB)
    write_lines(repo, lines)
    where = f"line {i + 1} (run {rows[i]['run_id']})"
    assert_banner(repo, where, f"{FORGED_BPB:.6f}")

    forged = (repo / STORE / RUNS_JSONL).read_bytes()
    fake_run(repo, 1.06, seed=10)  # a later run is not judged against the forged best
    for command in (("keep",), ("discard",), ()):
        assert "uv run analyze.py reseal" in refused(analyze(repo, *command), where)
        assert (repo / STORE / RUNS_JSONL).read_bytes() == forged  # nothing written


def test_a_removed_moved_or_stripped_row_is_detected_on_every_read(store_repo):
    repo = store_repo
    lines, rows = lines_of(repo), ledger(repo)
    head = (repo / STORE / HEAD_FILE).read_bytes()
    edits = {  # edit: (runs.jsonl after it, what status names)
        "remove a middle row": (lines[:2] + lines[3:], f"line 2 (run {rows[1]['run_id']})"),
        "remove the last row": (lines[:-1], f"line {len(lines) - 1} (run {rows[-2]['run_id']})"),
        "swap two rows": ([lines[1], lines[0]] + lines[2:], f"line 1 (run {rows[1]['run_id']})"),
        "strip a row's chain field": (lines[:2] + [edited(lines[2], **{CHAIN_FIELD: None})] + lines[3:],
                                      f"line 3 (run {rows[2]['run_id']}) has no {CHAIN_FIELD}"),
        # a copy of the last row appended: its chain field points at the row before the last
        "add a row": (lines + [lines[-1]], f"line {len(lines)} (run {rows[-1]['run_id']})"),
        "remove the head record": (lines, f"line {len(lines)} (run {rows[-1]['run_id']}) has no head"),
    }
    for edit, (after, where) in edits.items():
        write_lines(repo, after)
        if edit == "remove the head record":
            (repo / STORE / HEAD_FILE).unlink()
        status = analyze(repo, "status")
        assert status.returncode == 1 and status.stdout.startswith(BANNER), (edit, status.stdout)
        assert where in status.stdout and "Traceback" not in status.stderr, (edit, status.stdout)
        write_lines(repo, lines)
        (repo / STORE / HEAD_FILE).write_bytes(head)
        assert analyze(repo, "status").returncode == 0, edit  # undone: the ledger chains again
    write_lines(repo, lines[:2] + lines[3:])
    assert_banner(repo, f"line 2 (run {rows[1]['run_id']})", "0.998000")
    refused(analyze(repo, "keep"), f"line 2 (run {rows[1]['run_id']})")


def test_a_wrongly_typed_row_is_one_line_in_every_command(store_repo):
    repo = store_repo
    lines, rows = lines_of(repo), ledger(repo)
    lines[1] = edited(lines[1], status=5)
    write_lines(repo, lines)
    fake_run(repo, 1.06, seed=10)
    where = f"line 2 (run {rows[1]['run_id']}) has status 5, not one of pending, keep"
    for command in COMMANDS:
        if command == ("compare", "A", "B"):
            command = ("compare", rows[0]["run_id"], rows[1]["run_id"])
        proc = analyze(repo, *command)
        if command == ("status",):
            assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
            assert proc.stdout.startswith(BANNER) and where in proc.stdout, proc.stdout
            continue
        error = refused(proc, where)
        assert "fix that line" in error and "then accept the ledger with `uv run analyze.py reseal`" in error


def test_a_ledger_from_before_the_chain_is_read_and_chained_on_its_next_write(store_repo):
    repo = store_repo
    rows = ledger(repo)
    # runs.jsonl as analyze.py wrote it before the chain: the rows alone, no head record
    write_lines(repo, [json.dumps(r, sort_keys=True) for r in rows])
    (repo / STORE / HEAD_FILE).unlink()
    status = analyze(repo, "status")
    assert status.returncode == 0 and "best: " in status.stdout and "val_bpb 1.000000" in status.stdout
    fake_run(repo, 1.07, seed=11)
    assert analyze(repo).returncode == 0
    assert all(CHAIN_FIELD in json.loads(line) for line in lines_of(repo))
    assert json.loads((repo / STORE / HEAD_FILE).read_text())["rows"] == len(rows) + 1
    lines = lines_of(repo)  # chained now: a row stripped of its chain field no longer passes
    write_lines(repo, [lines[0], edited(lines[1], **{CHAIN_FIELD: None})] + lines[2:])
    refused(analyze(repo, "keep"), f"line 2 (run {rows[1]['run_id']}) has no {CHAIN_FIELD}")


def test_reseal_accepts_a_checked_ledger_and_status_says_so_from_then_on(store_repo):
    repo = store_repo
    lines, rows = lines_of(repo), ledger(repo)
    lines[1] = edited(lines[1], status=5)
    write_lines(repo, lines)
    refused(analyze(repo, "reseal"), "has status 5")  # a row no reader can use is never sealed
    lines[1] = edited(lines[1], status="keep", description="baseline, fixed by hand")
    write_lines(repo, lines)
    proc = analyze(repo, "reseal")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"resealed {len(rows)} row(s) as they are now; it was broken: ")
    status = analyze(repo, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("note: this ledger was resealed by hand 1 time(s)")
    assert f"line 2 (run {rows[1]['run_id']})" in status.stdout.splitlines()[0]
    assert "baseline, fixed by hand" in status.stdout and "best: " in status.stdout
    fake_run(repo, 1.07, seed=11)  # the night goes on, and the note stays
    assert analyze(repo).returncode == 0
    assert "resealed by hand 1 time(s)" in analyze(repo, "status").stdout
    assert analyze(repo, "reseal").stdout == "the ledger chains: nothing to reseal\n"
