"""The morning report (`analyze.py report`, analysis/html_report.py): the page's parts on small stores with
known answers (empty, only crashes, a run without metrics), and the page opened in headless Chromium on a
store made of a real tiny CPU run plus synthetic history: no script errors, a row per run, the kept
change's diff, the filter working from the URL, a screenshot that is not blank."""

import html as html_text
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import synthetic
from analysis import html_report, nights, verdict
from analysis.store import Store
from conftest import synthetic_accepted
from repos import CRASH_LOG, GIT_ENV, analyze, baseline, commit_change, fake_run, git, head, ledger, make_repo

# these tests analyse runs written by tests/synthetic.py, which never trained
pytestmark = pytest.mark.usefixtures("accept_synthetic")

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_TIMEOUT_S = 120      # a cold headless start on a loaded 2-core machine takes seconds; this is only a hang guard
VIRTUAL_TIME_MS = 3000        # virtual time the page's script gets before the DOM is dumped (it runs at load)


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path)


def report(repo):
    proc = analyze(repo, "report")
    assert proc.returncode == 0, proc.stderr
    path = repo / ".auto-log-research" / "report.html"
    assert proc.stdout.startswith("wrote .auto-log-research/report.html (") and f"file://{path}" in proc.stdout
    return path.read_text()


def section(html: str, name: str) -> str:
    """The HTML of one <section id=name>."""
    return html.split(f'<section id="{name}">', 1)[1].split("</section>", 1)[0]


def text_of(fragment: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment)).strip()


# ---------------------------------------------------------------------------
# The parts, without a browser
# ---------------------------------------------------------------------------

def test_an_empty_store_says_how_to_start(repo):
    html = report(repo)
    assert "No runs yet." in text_of(section(html, "night")) and "uv run supervise.py" in html
    assert text_of(section(html, "kept")) == "What was kept Nothing kept yet."
    assert text_of(section(html, "failures")) == "Failures No crashes and no invalid runs."
    assert "<script src" not in html and "http://" not in html and "https://" not in html  # nothing from a network


def test_a_store_of_crashes_groups_them_by_cause(repo):
    for i in range(3):  # the same bug three times; the allocation size differs, the cause does not
        log = CRASH_LOG.replace("2.00 GiB", f"{i + 1}.00 GiB")
        synthetic.write_run(repo, synthetic.make_records(n_steps=20, seed=i), None, log, truncate_metrics=True)
        assert analyze(repo).returncode == 0
    (repo / "run.log").write_text("Traceback (most recent call last):\n  File \"train.py\", line 3\nSyntaxError: invalid syntax\n")
    (repo / "metrics.jsonl").unlink()
    assert analyze(repo).returncode == 0  # a crash without metrics
    html = report(repo)
    ids = [r["run_id"] for r in ledger(repo)]
    assert text_of(section(html, "failures")) == (
        "Failures Crashes and invalid runs grouped by cause (the error line; causes that differ only in numbers "
        "are one). 3× (3 crash; runs #1–#3) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB "
        f"#1 {ids[0]} , #2 {ids[1]} , #3 {ids[2]} "
        f"1× (1 crash; runs #4–#4) SyntaxError: invalid syntax #4 {ids[3]}")
    night = text_of(section(html, "night"))
    assert "No kept run yet" in night and "4 experiments" in night and "4 crash" in night
    assert html.count('<tr class="run"') == 4 and html.count('class="fail"') == 4  # crosses on the chart
    assert "Nothing kept yet." in section(html, "kept")


def test_kept_chain_reads_like_a_changelog(repo):
    baseline(repo)
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
    for seed in (1, 2, 3):
        fake_run(repo, 0.95 + seed / 1000, seed=seed)
        assert analyze(repo).returncode == 0
    assert analyze(repo, "keep").returncode == 0
    commit_change(repo, "MATRIX_LR = 0.05", "MATRIX_LR = 0.5", "matrix lr 0.5")
    fake_run(repo, 1.2, seed=9)
    assert analyze(repo).returncode == 0
    rows = ledger(repo)
    kept_row = rows[5]  # the third run of the change: its verdict kept it
    chain = html_report.kept_chain(Store(repo), rows, html_report.verdict.store_comparable(rows))
    assert [(c["description"], c["n"], round(c["mean"], 6)) for c in chain] == [("baseline", 3, 1.0),
                                                                                  ("matrix lr 0.05", 3, 0.952)]
    assert chain[1]["delta"] == kept_row["delta_best"] and chain[1]["p_value"] == kept_row["p_value"]
    changed = [(kind, line.split("#")[0].strip()) for kind, line in chain[1]["diff"] if kind in ("add", "del")]
    assert changed == [("del", "-MATRIX_LR = 0.04"), ("add", "+MATRIX_LR = 0.05")]
    html = report(repo)
    kept = section(html, "kept")
    assert '<span class="add">+MATRIX_LR = 0.05 ' in kept and "matrix lr 0.5" not in kept
    assert f"Δ <span class=\"good\">{kept_row['delta_best']:+.6f}</span>" in kept
    night = text_of(section(html, "night"))
    assert night.startswith("val_bpb 1.000000 → 0.952000 ( -0.048000 , -30.4σ) ± 0.001581 noise σ per run "
                            "(pooled from repeats (4 df))")  # σ² = (8e-6 + 2e-6) / 4 df
    assert "7 experiments 6 keep 0 discard 0 rerun 1 pending 0 crash 0 invalid" in night
    # the change ran under seeds 1, 2, 3, the baseline under 42, 43, 44: nothing pairs
    assert ("seed pairing: no estimate yet (it needs the noise σ and an idea run at least twice "
            "under the best's seeds)") in html_text.unescape(night)


def test_each_run_opens_its_analysis_with_its_figures_and_notes(repo):
    fake_run(repo, 1.0)
    assert analyze(repo).returncode == 0
    run_id = head(repo)
    folder = repo / ".auto-log-research" / run_id
    notes = repo / ".auto-log-research" / "notes"
    (notes / f"{run_id}.md").write_text(
        "The **gap** is steady; see [the curve](val_bpb.png).\n<script>alert(1)</script>\n")
    (notes / "ideas_queue.md").write_text("# Ideas\n\n1. wider MLP\n")
    html = report(repo)
    template = html.split(f'<template id="run-{run_id}">', 1)[1].split("</template>", 1)[0]
    assert "<h2>Verdict</h2>" in template and "<table>" in template  # analysis.md rendered, tables included
    assert f'<img loading="lazy" src="{run_id}/loss_vs_step.png"' in template
    assert f'<a href="{run_id}/val_bpb.png">the curve</a>' in template  # relative links resolve from the store
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in template and "<script>alert" not in html  # raw HTML stays text
    learned = section(html, "learned")
    assert "<li>wider MLP</li>" in learned and "<strong>gap</strong>" in learned


def test_a_store_from_before_notes_shows_its_notes_where_it_kept_them(repo):
    """insights.md and ideas_queue.md at the store's top, a run's notes below analysis.md's heading:
    the report reads them there; the next keep moves the two files into notes/."""
    fake_run(repo, 1.0)
    assert analyze(repo).returncode == 0
    store, run_id = repo / ".auto-log-research", head(repo)
    shutil.rmtree(store / "notes")
    analysis = (store / run_id / "analysis.md").read_text()
    old_style = analysis.split("## Agent Investigation Notes")[0] + "## Agent Investigation Notes\n\n"
    (store / run_id / "analysis.md").write_text(old_style + "A **plateau** after step 10.\n")
    (store / "insights.md").write_text("# Insights\n\n- a **legacy** finding\n")
    (store / "ideas_queue.md").write_text("# Ideas\n\n1. an old idea\n")
    learned = section(report(repo), "learned")
    assert "<strong>legacy</strong>" in learned and "<li>an old idea</li>" in learned
    assert "<strong>plateau</strong>" in learned
    assert analyze(repo, "keep").returncode == 0
    assert not (store / "insights.md").exists() and not (store / "ideas_queue.md").exists()
    moved = (store / "notes" / "insights.md").read_text()
    assert "- a **legacy** finding" in moved and "## Current Best" in moved
    assert (store / "notes" / "ideas_queue.md").read_text() == "# Ideas\n\n1. an old idea\n"


def test_the_report_stays_out_of_analyze(repo):
    fake_run(repo, 1.0)
    assert analyze(repo).returncode == 0
    assert not (repo / ".auto-log-research" / "report.html").exists()  # only `report` (and the supervisor) writes it
    code = "import sys, analyze; rc = analyze.main(['report']); assert rc == 0 and 'matplotlib' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, env={**os.environ},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_broken_ledger_is_one_error_line(repo):
    store = Store(repo)
    store.dir.mkdir()
    store.path("runs.jsonl").write_text("{not json\n")
    proc = analyze(repo, "report")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_diff_lines_and_causes():
    assert html_report.diff_lines("# header\n--- a\n+++ b\n@@ -1 +1 @@\n-x = 1\n+x = 2\n y\n") == [
        ("meta", "# header"), ("meta", "--- a"), ("meta", "+++ b"), ("hunk", "@@ -1 +1 @@"), ("del", "-x = 1"),
        ("add", "+x = 2"), ("ctx", " y")]
    assert html_report.cause_key("OOM: tried 2.00 GiB at line 12") == html_report.cause_key("OOM: tried 3.5 GiB at line 9")
    assert html_report.nice_ticks(0.97, 1.01) == [0.97, 0.98, 0.99, 1.0, 1.01]


# ---------------------------------------------------------------------------
# Nights: the last in full, the earlier ones a line each
# ---------------------------------------------------------------------------

def stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def test_nights_are_cut_by_the_night_rows_record_or_by_a_gap():
    t = 1_800_000_000
    rows = [{"analyzed_at": stamp(t)}, {"analyzed_at": stamp(t + 60)},            # by hand
            {"analyzed_at": stamp(t + 120), "night": "A"},                        # night A starts
            {"analyzed_at": stamp(t + 400)},                                      # by hand, in A
            {"analyzed_at": stamp(t + 700), "night": "A"},
            {"analyzed_at": stamp(t + 800), "night": "B"},                        # back to back
            {"analyzed_at": stamp(t + 900)},                                      # the morning's repeat
            {"analyzed_at": stamp(t + 900 + nights.NIGHT_GAP_S + 1)},             # the next day, by hand
            {"started_at": stamp(t + 900 + nights.NIGHT_GAP_S + 60)},             # an old row
            {}]                                                                   # no time at all
    assert nights.night_spans(rows) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert nights.night_spans([]) == []


@contextmanager
def supervised_night(repo: Path, started_at: str):
    """A night running on the store, as analyze.py sees one: night.json naming a live supervise.py
    (a stand-in process that only waits) and the start stamp its supervisor wrote."""
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "supervise.py"])
    store = Store(repo)
    store.dir.mkdir(exist_ok=True)
    store.path("night.json").write_text(json.dumps({"pid": stand_in.pid, "verdict": verdict.VERDICT_MODE,
                                                    "started_at": started_at}) + "\n")
    try:
        yield
    finally:
        stand_in.kill()
        stand_in.wait()
        store.path("night.json").unlink()


def change_kept(repo, old, new, message, values):
    commit_change(repo, old, new, message)
    for seed, value in enumerate(values, start=1):
        fake_run(repo, value, seed=seed)
        assert analyze(repo).returncode == 0
    assert analyze(repo, "keep").returncode == 0


@pytest.fixture(scope="module")
def three_nights(tmp_path_factory):
    """The baseline run by hand (no night recorded), then two supervised nights, each keeping a
    change; the second also a crash."""
    with synthetic_accepted():
        repo = make_repo(tmp_path_factory.mktemp("nights") / "repo")
        baseline(repo)
        with supervised_night(repo, "2026-12-02T22:00:00+0000"):
            change_kept(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05", (0.951, 0.952, 0.953))
        with supervised_night(repo, "2026-12-03T22:00:00+0000"):
            change_kept(repo, "MATRIX_LR = 0.05", "MATRIX_LR = 0.06", "matrix lr 0.06", (0.901, 0.902, 0.903))
            synthetic.write_run(repo, synthetic.make_records(n_steps=20), None, CRASH_LOG, truncate_metrics=True)
            assert analyze(repo).returncode == 0
        git(repo, "checkout", "train.py")
        yield repo


def night_table(html: str) -> list:
    """The nights table's rows as text, the latest night first."""
    body = section(html, "nights").split("<tbody>", 1)[1]
    return [text_of(row) for row in body.split("</tr>")[:-1]]


def test_the_page_shows_the_last_night_in_full_and_the_earlier_ones_as_a_line(three_nights):
    repo = three_nights
    rows = ledger(repo)
    assert [r.get("night") for r in rows] == [None] * 3 + ["2026-12-02T22:00:00+0000"] * 3 + \
        ["2026-12-03T22:00:00+0000"] * 4
    ids = [r["run_id"] for r in rows]
    html = report(repo)
    assert re.findall(r'<tr class="run" data-run="([^"]+)"', html) == ids[6:]  # night 3's runs only
    assert re.findall(r'<template id="run-([^"]+)">', html) == ids[6:]        # and only their analyses
    when = [nights.clock(nights.row_time(r)) for r in rows]
    hours = [f"{(nights.row_time(rows[b - 1]) - nights.row_time(rows[a])) / 3600:.1f}" for a, b in
             ((0, 3), (3, 6), (6, 10))]
    assert night_table(html) == [
        f"3 {when[6]} {when[9]} {hours[2]} 4 7–10 3 1 1 0.902000 this page",
        f"2 {when[3]} {when[5]} {hours[1]} 3 4–6 3 0 1 0.952000 uv run analyze.py report --night 2",
        f"1 {when[0]} {when[2]} {hours[0]} 3 1–3 3 0 1 1.000000 uv run analyze.py report --night 1"]
    assert text_of(html.split('<p class="small" id="shown-night">')[1].split("</p>")[0]) == (
        "This page shows night 3 of 3 in full: its runs, their analyses, notes and failures, and its part "
        "of the chart. The headline and the best are the whole store's.")
    night = text_of(section(html, "night"))  # the headline is the whole store's
    assert night.startswith("val_bpb 1.000000 → 0.902000") and "10 experiments 9 keep" in night
    kept = text_of(section(html, "kept"))
    assert "base baseline" in kept and "matrix lr 0.06 best" in kept and "matrix lr 0.05" not in kept
    assert "… 1 change kept in earlier nights" in kept
    assert html.count('<circle class="keep"') == 3 and html.count('class="fail"') == 1  # night 3's points


def table_column(fragment: str, name: str) -> list:
    """The text of each cell of the column headed `name` in the first table of `fragment`."""
    head, body = fragment.split("<tbody>", 1)
    column = [text_of(th) for th in re.findall(r"<th[^>]*>(.*?)</th>", head, re.S)].index(name)
    rows = body.split("</tbody>", 1)[0].split("</tr>")[:-1]
    return [text_of(re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)[column]) for row in rows]


def test_each_run_and_each_night_names_the_agents_of_its_sessions(repo, monkeypatch):
    """Rows record their session's agent and model (AUTORESEARCH_AGENT, set by the night): the nights
    table names each night's, distinct in order of first use; the runs table and the line above it
    the shown night's; a night made by hand names none, and no "None" is printed."""
    monkeypatch.delenv("AUTORESEARCH_AGENT", raising=False)
    baseline(repo)  # night 1, by hand
    with supervised_night(repo, "2026-12-02T22:00:00+0000"):
        monkeypatch.setenv("AUTORESEARCH_AGENT", "codex gpt-test")
        change_kept(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05", (0.951, 0.952, 0.953))
    with supervised_night(repo, "2026-12-03T22:00:00+0000"):
        commit_change(repo, "MATRIX_LR = 0.05", "MATRIX_LR = 0.06", "matrix lr 0.06")
        for seed, agent in ((1, "claude claude-opus-4-1"), (2, "api claude-sonnet-4-5"),
                            (3, "claude claude-opus-4-1")):
            monkeypatch.setenv("AUTORESEARCH_AGENT", agent)
            fake_run(repo, 0.93 + seed / 1000, seed=seed)
            assert analyze(repo).returncode == 0
    html = report(repo)
    assert table_column(section(html, "nights"), "agents") == [  # the latest night first
        "claude claude-opus-4-1, api claude-sonnet-4-5", "codex gpt-test", ""]
    runs = section(html, "runs")
    assert text_of(runs.split('id="night-agents">', 1)[1].split("</p>", 1)[0]) == \
        "agents: claude claude-opus-4-1 (2 runs), api claude-sonnet-4-5 (1 run)"
    assert table_column(runs, "agent") == [
        "claude claude-opus-4-1", "api claude-sonnet-4-5", "claude claude-opus-4-1"]
    assert analyze(repo, "report", "--night", "1").returncode == 0
    page = (repo / ".auto-log-research" / "report-night-1.html").read_text()
    runs = section(page, "runs")  # the runs made by hand: no agent line, no agent column
    assert 'id="night-agents"' not in runs and ">agent</th>" not in runs
    assert len(re.findall(r'<tr class="run"', runs)) == 3
    table = runs.split("<template", 1)[0]  # (a synthetic run's analysis.md says "data None")
    assert "None" not in text_of(table) and "None" not in text_of(section(page, "nights"))
    assert table_column(section(page, "nights"), "agents")[-1] == ""  # night 1's, on its own page


def test_a_chosen_night_has_its_own_page_linked_from_the_morning_page(three_nights):
    repo = three_nights
    ids = [r["run_id"] for r in ledger(repo)]
    proc = analyze(repo, "report", "--night", "1")
    path = repo / ".auto-log-research" / "report-night-1.html"
    assert proc.returncode == 0 and proc.stdout.startswith(
        "wrote .auto-log-research/report-night-1.html (") and "night 1 of 3: 3 of 10 runs" in proc.stdout
    page = path.read_text()
    assert re.findall(r'<tr class="run" data-run="([^"]+)"', page) == ids[:3]  # the runs made by hand
    table = night_table(page)
    assert table[0].endswith(" report.html") and table[2].endswith(" this page")
    assert table[1].endswith(" uv run analyze.py report --night 2")
    kept = text_of(section(page, "kept"))
    assert "… 1 change kept in later nights" in kept and "matrix lr 0.06 best" in kept
    html = report(repo)  # the morning page now links the night's page
    assert night_table(html)[2].endswith(" report-night-1.html") and '<a href="report-night-1.html">' in html
    assert "uv run analyze.py report --night 2" in html
    for bad in ("4", "0", "x"):
        proc = analyze(repo, "report", "--night", bad)
        assert proc.returncode in (1, 2) and proc.stderr.startswith("error: ") and \
            len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "there is no night 4 in the store (nights 1-3)" in analyze(repo, "report", "--night", "4").stderr


# ---------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------

def chromium():
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def browse(url: str, profile: Path, *args) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` (file:// only: nothing leaves the machine)."""
    return subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           f"--virtual-time-budget={VIRTUAL_TIME_MS}", *args, url],
                          capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)


def cpu_fake_run(repo, real: dict, value: float, seed: int, **kw):
    """A synthetic run like the real CPU run `real` (same device, budget and clock rules), so it is comparable."""
    records = synthetic.make_records(n_steps=60, step_ms=40.0, seed=seed, layer_every=10, depth=2,
                                     warmup_steps=real["config"].get("CLOCK_WARMUP_STEPS", 2),
                                     budget_s=real["time_budget_s"])
    summary = synthetic.make_summary(records, value, commit=head(repo), seed=seed, device="cpu",
                                     train_sha256=__import__("test_analyze").train_sha(repo),
                                     budget_s=real["time_budget_s"], config={**real["config"], "SEED": seed},
                                     peak_vram_mb=0.0, mfu_percent=0.0, **kw)
    synthetic.write_run(repo, records, summary, f"run seed {seed}\nval_bpb: {value}\n")


@pytest.fixture(scope="module")
def night(prepared, tmp_path_factory):
    """A store: a real tiny CPU training run as the baseline, two synthetic repeats of it, a kept change, a
    discarded one, the same crash twice, notes and an ideas queue; report.html written."""
    with synthetic_accepted():
        repo = make_repo(tmp_path_factory.mktemp("night") / "repo")
        env = {**os.environ, **GIT_ENV, "AUTORESEARCH_TIME_BUDGET": "4"}
        train = subprocess.run([sys.executable, "launch.py"], cwd=repo, capture_output=True, env=env, timeout=300)
        assert train.returncode == 0, (repo / "run.log").read_text()[-2000:]
        real = json.loads((repo / "run_summary.json").read_text())
        assert analyze(repo).returncode == 0
        sigma = 0.002 * real["val_bpb"]
        for seed in (43, 44):
            cpu_fake_run(repo, real, real["val_bpb"] + (seed - 43.5) * sigma, seed)
            proc = analyze(repo)
            assert proc.returncode == 0 and "INVALID" not in proc.stdout, proc.stdout
        assert analyze(repo, "keep").returncode == 0
        commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
        for seed in (1, 2, 3):
            cpu_fake_run(repo, real, real["val_bpb"] * 0.97 + seed * sigma / 4, seed)
            assert analyze(repo).returncode == 0
        assert analyze(repo, "keep").returncode == 0
        commit_change(repo, "MATRIX_LR = 0.05", "MATRIX_LR = 0.5", "matrix lr 0.5 (too high)")
        cpu_fake_run(repo, real, real["val_bpb"] * 1.1, 5)
        assert analyze(repo).returncode == 0
        assert analyze(repo, "discard").returncode == 0
        for _ in range(2):
            synthetic.write_run(repo, synthetic.make_records(n_steps=20), None, CRASH_LOG, truncate_metrics=True)
            assert analyze(repo).returncode == 0
        git(repo, "checkout", "train.py")
        store = repo / ".auto-log-research"
        (store / "notes").mkdir(exist_ok=True)
        (store / "notes" / "ideas_queue.md").write_text("# Ideas queue\n\n1. **warmup 2x**: the loss is still falling at the end\n"
                                              "2. a wider MLP\n"
                                              "3. as in ![the paper's figure](https://example.invalid/beacon.png)\n")
        first = ledger(repo)[0]["run_id"]
        (store / "notes" / f"{first}.md").write_text(
            "Checked the train/val gap by hand: steady, no overfitting.\n")
        report(repo)
        return repo


pytestmark_browser = pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (Debian: apt-get install -y "
                                                                 "chromium; .ci/run installs it as root)")


@pytestmark_browser
def test_the_page_in_headless_chromium(night, tmp_path):
    path = night / ".auto-log-research" / "report.html"
    rows = ledger(night)
    proc = browse(path.as_uri(), tmp_path / "profile", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if re.search(r"error|uncaught", line, re.I)], console
    assert "data-errors" not in dom.split("<head>")[0], dom.split("<head>")[0]  # script and resource errors
    assert f'data-ready="{len(rows)}"' in dom  # the script ran to its end and counted a row per run
    assert dom.count('<tr class="run"') == len(rows) == 9
    # one night (every run analysed by hand, seconds apart): shown in full, its line in the nights table
    [line] = night_table(dom)
    keeps = sum(r["status"] == "keep" for r in rows)
    assert line.startswith("1 ") and f" 9 1–9 {keeps} 2 1 " in line and line.endswith(" this page"), line
    kept = section(dom, "kept")
    assert '<span class="add">+MATRIX_LR = 0.05 ' in kept and '<span class="del">-MATRIX_LR = 0.04 ' in kept
    assert "2× (2 crash;" in text_of(section(dom, "failures"))
    assert "steady, no overfitting" in section(dom, "learned") and "<strong>warmup 2x</strong>" in dom
    # nothing from outside: an image the agent's markdown names on another host is a link, not fetched
    assert '<a href="https://example.invalid/beacon.png">the paper\'s figure</a>' in dom
    assert "<img" not in dom.split("beacon.png")[0][-200:] and 'src="https://' not in dom
    assert "Content-Security-Policy" in path.read_text()
    assert dom.count("<polyline fill=\"none\"") == 2  # the two kept codes' validation curves
    # the state in the URL: filtered to the crashes, with the first one open
    crash = next(r["run_id"] for r in rows if r["status"] == "crash")
    proc = browse(path.as_uri() + f"#status=crash&run={crash}", tmp_path / "profile", "--dump-dom")
    table = section(proc.stdout, "runs")
    visible = re.findall(r'<tr class="run[^"]*" data-run="([^"]+)" data-status="(\w+)"(?! style="display: none;")>', table)
    assert [s for _, s in visible] == ["crash", "crash"] and 'id="shown">2 of 9 runs' in table
    assert '<tr class="detail">' in table and "## Crash" not in table and "<h2>Crash</h2>" in table


@pytestmark_browser
def test_the_screenshot_is_not_blank(night, tmp_path):
    from PIL import Image
    shot = tmp_path / "report.png"
    proc = browse((night / ".auto-log-research" / "report.html").as_uri(), tmp_path / "profile",
                  f"--screenshot={shot}", "--window-size=1200,1600")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1200)
    dark = pixels < 128  # text, the chart's points and lines
    assert dark.mean() > 0.01 and dark[:400].mean() > 0.01 and dark[400:1200].mean() > 0.005
    green = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    assert ((green[..., 1] - green[..., 0] > 60) & (green[..., 1] - green[..., 2] > 30)).sum() > 100  # kept points


@pytestmark_browser
def test_the_page_fetches_nothing_from_outside_even_an_image_put_into_it(night, tmp_path):
    """The report's Content-Security-Policy, in a real browser: an <img> of another origin written
    into the page (as a report rewritten by hand or by the agent would have it) is never requested
    from a server on loopback."""
    import http.server
    import threading
    requests = []

    class Counter(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = night / ".auto-log-research" / "beacon-test.html"
        html = (night / ".auto-log-research" / "report.html").read_text()
        beacon = f'<img src="http://127.0.0.1:{server.server_port}/beacon.png">'
        page.write_text(html.replace("<h1>", beacon + "<h1>", 1))
        proc = browse(page.as_uri(), tmp_path / "profile", "--dump-dom")
        assert proc.returncode == 0 and beacon.split(">")[0] in proc.stdout, proc.stderr[-2000:]
        assert requests == [], requests
        # the control: the same page without the policy does fetch it (so the server was reachable)
        page.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text()))
        control = browse(page.as_uri(), tmp_path / "profile", "--dump-dom")
        assert control.returncode == 0
    finally:
        server.shutdown()
    assert requests == ["/beacon.png"], requests  # once: by the page without the policy only
