"""
Idea claims: which worker of a night is testing which idea of ideas_queue.md, so that N agents
sharing one store never test the same idea twice.

    claims.json   {"claims": [{idea, key, worker, life, claimed_at, state, run_id, outcome}, ...]}

A claim is `claimed` (its worker is testing it), `tested` (its run was kept or discarded: the idea
is done, for every worker) or `released` (its worker moved on without a decision, or is gone). A
claimed idea whose worker is gone counts as released, so a crashed worker never blocks an idea. A
worker's life is a file in the store's .lives/ that its supervisor holds locked while it lives
(harness/proc.py hold_life): the kernel releases it when the supervisor ends, even by SIGKILL, a
reused pid cannot fake it, and an agent in its box, which sees no process of the night, can ask.
Ideas are matched by their text, normalised (list markers, emphasis, case and spacing do not
count), so the agents can copy a line of ideas_queue.md as it is. The functions on lists are pure;
the store's file is read and written by `read` / `write` only, under the store lock (analyze.py's
commands).
"""

import json
import re

from harness import contract
from harness.contract import HarnessError
from harness import proc

CLAIMS_FILE = "claims.json"
LIVES_DIR = ".lives"  # in the store: the workers' life files (a dot-folder: no run's archive)
CLAIMED, TESTED, RELEASED = "claimed", "tested", "released"
# shorter than this is no idea but a fragment ("1.", "lr"): refused, so keys stay distinct
MIN_KEY_CHARS = 8
# "1. ", "- ", "* [ ] " before an idea
_MARKER = re.compile(r"^\s*(?:[-*+]\s+|\d+[.)]\s*|\[[ xX]\]\s*)+")
# markdown emphasis; an underscore inside a name stays
_EMPHASIS = re.compile(r"[*`~]+|(?<!\w)_+|_+(?!\w)")


class ClaimRefused(HarnessError):
    """The idea is another live worker's, or already tested: take the next one."""


def idea_key(text: str) -> str:
    """The idea as claims compare it: without its list marker and emphasis, lower case, single
    spaces, no trailing punctuation. Raises HarnessError for text too short to name an idea."""
    key = _EMPHASIS.sub("", _MARKER.sub("", text or ""))
    key = re.sub(r"\s+", " ", key).strip().rstrip(".:;,").lower()
    if len(key) < MIN_KEY_CHARS:
        raise HarnessError(f"{text!r} is too short to name an idea: pass the idea's whole line of "
                           f"ideas_queue.md")
    return key


def alive_in(store):
    """Whether the worker whose life file is named so lives, in `store`."""
    return lambda life: proc.life_held(store.path(LIVES_DIR) / life)


def is_live(claim: dict, alive) -> bool:
    """Whether a claim still holds its idea: claimed, and its worker (if it named its life) lives;
    `alive`: alive_in(store), or a stand-in. A claim that names a pid instead was made by a night
    from before the lives, which is over."""
    if claim["state"] != CLAIMED:
        return False
    if claim.get("life") is None:
        return "pid" not in claim
    return alive(claim["life"])


def take(claims: list, idea: str, worker: str, life, alive, now: str = None) -> tuple:
    """(claims, notes) after `worker` claims `idea`. Its other live claim, if any, is released (a
    worker tests one idea at a time), and so is a claim whose worker is gone. Raises ClaimRefused
    when the idea was tested already, or is claimed by another worker that is alive."""
    key, now = idea_key(idea), now or contract.stamp()
    claims, notes = [dict(c) for c in claims], []
    for c in claims:
        if c["key"] != key:
            continue
        if c["state"] == TESTED:
            raise ClaimRefused(f"idea already tested by {c['worker']} (run {c.get('run_id')}, "
                               f"{c.get('outcome')}): take the next unclaimed idea "
                               f"(`uv run analyze.py claims`)")
        if c["state"] == CLAIMED and c["worker"] != worker:
            if is_live(c, alive):
                raise ClaimRefused(f"idea already claimed by {c['worker']} since "
                                   f"{c['claimed_at']}: take the next unclaimed idea "
                                   f"(`uv run analyze.py claims`)")
            c["state"] = RELEASED
            notes.append(f"released {c['worker']}'s claim on it: that worker is gone")
    mine = next((c for c in claims
                 if c["key"] == key and c["worker"] == worker and c["state"] == CLAIMED), None)
    for c in claims:
        if c["worker"] == worker and c["state"] == CLAIMED and c is not mine:
            c["state"] = RELEASED
            notes.append(f"released your earlier claim on {c['idea']!r} (a worker tests one idea "
                         f"at a time)")
    if mine is None:
        claims.append({"idea": idea.strip(), "key": key, "worker": worker, "life": life,
                       "claimed_at": now, "state": CLAIMED, "run_id": None, "outcome": None})
    else:
        mine["life"] = life
    return claims, notes


def finish(claims: list, worker: str, run_id: str, outcome: str) -> tuple:
    """(claims, the tested claim or None): `worker`'s claimed idea is decided (`keep` or `discard`
    of `run_id`), so no worker tests it again."""
    claims = [dict(c) for c in claims]
    done = next((c for c in reversed(claims) if c["worker"] == worker and c["state"] == CLAIMED),
                None)
    if done is not None:
        done.update(state=TESTED, run_id=run_id, outcome=outcome)
    return claims, done


def release_worker(claims: list, worker: str) -> tuple:
    """(claims, how many released): every live claim of `worker` (it ended without deciding
    them)."""
    claims = [dict(c) for c in claims]
    mine = [c for c in claims if c["worker"] == worker and c["state"] == CLAIMED]
    for c in mine:
        c["state"] = RELEASED
    return claims, len(mine)


def state_of(claims: list, line: str, alive):
    """The claim that decides a line of ideas_queue.md: tested, else live; None when the idea is
    free."""
    try:
        key = idea_key(line)
    except HarnessError:
        return None
    same = [c for c in claims if c["key"] == key]
    return (next((c for c in same if c["state"] == TESTED), None)
            or next((c for c in same if is_live(c, alive)), None))


# a numbered or bulleted line of ideas_queue.md
IDEA_LINE = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S")


def queue_ideas(text: str) -> list:
    """The idea lines of ideas_queue.md, in order (headings and prose are not ideas)."""
    return [line.strip() for line in (text or "").splitlines() if IDEA_LINE.match(line)]


def listing(claims: list, queue_text: str, alive) -> str:
    """`analyze.py claims`: every idea of the queue with its state, then claims on ideas no longer
    queued."""
    out, shown = [], set()
    for line in queue_ideas(queue_text):
        c = state_of(claims, line, alive)
        if c is None:
            tag = "free"
        elif c["state"] == TESTED:
            tag = f"tested by {c['worker']} (run {c.get('run_id')}, {c.get('outcome')})"
        else:
            tag = f"claimed by {c['worker']} since {c['claimed_at']}"
        if c is not None:
            shown.add(id(c))
        out.append(f"[{tag}] {line}")
    others = [c for c in claims
              if id(c) not in shown and (c["state"] == TESTED or is_live(c, alive))]
    if others:
        out.append("not in ideas_queue.md:")
        for c in others:
            run = f" (run {c['run_id']}, {c['outcome']})" if c.get("run_id") else ""
            out.append(f"[{c['state']} by {c['worker']}{run}] {c['idea']}")
    return "\n".join(out) or "no ideas in ideas_queue.md and no claims yet"


def read(store) -> list:
    path = store.path(CLAIMS_FILE)
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())["claims"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HarnessError(f"{path} is corrupt ({e}); it is only ever replaced atomically, so it "
                           f"was edited by hand: fix it or remove it (every claim is then "
                           f"forgotten)") from None


def write(store, claims: list):
    """Replace claims.json (call under store.lock())."""
    contract.atomic_write(store.path(CLAIMS_FILE),
                          json.dumps({"claims": claims}, indent=1, sort_keys=True) + "\n")
