"""
One-time data preparation and the runtime utilities that train.py imports.

Part of the fixed harness: the agent edits train.py only, never this file. It owns
the constants that make runs comparable (sequence length, time budget, evaluation
size, vocabulary), the data (climbmix shards, the user's own corpus, or an offline
smoke-test corpus), the BPE tokenizer, and at run time the tokenizer wrapper, the
packing dataloader, the fixed metric `evaluate_bpb`, device helpers, the metrics
logger and the watchdog.

Usage:
    uv run prepare.py                    # 10 climbmix train shards + the pinned val shard
    uv run prepare.py --num-shards 4     # fewer shards
    uv run prepare.py --data PATH        # your own .txt / .jsonl / .parquet corpus
    uv run prepare.py --offline          # built-in smoke-test corpus (no network)

Everything lands in ~/.cache/autoresearch (or $AUTORESEARCH_CACHE).
"""

import argparse
import fcntl
import hashlib
import http.client
import json
import math
import os
import pickle
import random
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from bisect import bisect_right, insort
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schema

# ---------------------------------------------------------------------------
# Constants: fixed for every run so that val_bpb stays comparable
# ---------------------------------------------------------------------------

def _seconds_from_env(name: str, default: float) -> float:
    """$name as a positive, finite number of seconds, or `default` when it is unset. Anything else
    ends the process at import with one `error:` line: a run must never train (and be kept as a
    baseline) under a budget of -1 or NaN, nor die in a traceback over a typo."""
    raw = os.environ.get(name)
    if raw is None:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SystemExit(f"error: {name}={raw!r} is not a positive number of seconds")
    return value


MAX_SEQ_LEN = 2048            # context length of training and of the evaluation
# Training seconds per run (startup, compilation and evals excluded). Tests and benchmarks
# shorten it with $AUTORESEARCH_TIME_BUDGET; every summary records the budget it ran with.
DEFAULT_TIME_BUDGET_S = 300
TIME_BUDGET = _seconds_from_env("AUTORESEARCH_TIME_BUDGET", DEFAULT_TIME_BUDGET_S)
EVAL_TOKENS = 40 * 524288     # tokens behind the final val_bpb on CUDA (as in autoresearch)
VAL_CURVE_TOKENS = 2 * 524288  # per validation-curve point on CUDA: ~5 % of the final eval's cost
CPU_EVAL_TOKENS = 8 * MAX_SEQ_LEN  # final val_bpb off CUDA: a CPU run is a smoke test, not research
CPU_VAL_CURVE_TOKENS = 2 * MAX_SEQ_LEN
VOCAB_SIZE = 8192

SPECIAL_TOKENS = ["<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
BOS_TOKEN = SPECIAL_TOKENS[0]
# GPT-4 style split, but numbers in chunks of 1-2 digits (a small vocab should not spend merges on 3-digit numbers)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

CACHE_DIR = schema.cache_dir()
DATA_DIR = CACHE_DIR / "data"
TOKENIZER_DIR = CACHE_DIR / "tokenizer"
MANIFEST_PATH = CACHE_DIR / "manifest.json"

# climbmix-400b-shuffle: the public parquet layout autoresearch uses; shard_06542 is the pinned val shard.
BASE_URL = os.environ.get("AUTORESEARCH_DATA_URL",
                          "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main")
MAX_SHARD = 6542
VAL_SHARD = MAX_SHARD
DEFAULT_NUM_SHARDS = 10
DOWNLOAD_WORKERS = 8
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_BACKOFF_S = 2.0      # doubles after every failed attempt: 2, 4, 8, 16 s
DOWNLOAD_TIMEOUT_S = 60       # per socket operation, not per file
PROBE_TIMEOUT_S = 10          # how long to wait before declaring the network absent

TOKENIZER_MAX_CHARS = 1_000_000_000  # enough text for a stable 8k vocabulary, bounded prepare time
TOKENIZER_DOC_CAP = 10_000           # chars taken from one document, so no single doc dominates

USER_DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")
VAL_FRACTION = 0.1            # share of --data / offline documents held out for validation
TXT_DOC_CHARS = 8_000         # a long .txt is cut at paragraph breaks into documents of about this size
ROWS_PER_FILE = 50_000        # documents per prepared train parquet file
ROW_GROUP_SIZE = 1024         # documents per parquet row group: the dataloader's unit of shuffling

WATCHDOG_BUDGET_FACTOR = 2.0  # a run is hung once it has used twice its budget ...
WATCHDOG_GRACE_S = 600        # ... plus ten minutes for startup, compilation and evaluation
# wall seconds from the watchdog's start (train.py's startup) to a run's end as "timeout"
WATCHDOG_S = _seconds_from_env("AUTORESEARCH_WATCHDOG_S", TIME_BUDGET * WATCHDOG_BUDGET_FACTOR + WATCHDOG_GRACE_S)
TIMEOUT_EXIT_CODE = 124       # as timeout(1)

RUN_METRICS = "metrics.jsonl"
RUN_SUMMARY = "run_summary.json"


class HarnessError(Exception):
    """A user-facing problem: printed as one line (`error: ...`) with no traceback."""


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

sha256_file = schema.sha256_file  # defined once in schema.py: analyze.py re-checks hashes without importing prepare


def verify_parquet(path, read_all: bool = False) -> int:
    """Number of rows of a parquet file with a string `text` column; HarnessError if it is not one.
    The footer check catches truncation; read_all also decodes every page (for fresh downloads)."""
    try:
        pf = pq.ParquetFile(path)
        schema_ = pf.schema_arrow
        if "text" not in schema_.names:
            raise HarnessError(f"parquet file {path} has no 'text' column (columns: {schema_.names})")
        text_type = schema_.field("text").type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            raise HarnessError(f"parquet file {path}: the 'text' column holds {text_type}, not strings")
        if read_all:
            for rg in range(pf.num_row_groups):
                pf.read_row_group(rg, columns=["text"])
    except (pa.ArrowException, OSError) as e:
        raise HarnessError(f"corrupt parquet file {path}: {e}") from None
    return pf.metadata.num_rows


def _write_parquet(path: Path, docs: list):
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": docs}), tmp, row_group_size=ROW_GROUP_SIZE)
    os.replace(tmp, path)


def _row_group_texts(pf: pq.ParquetFile, rg: int) -> list:
    """The non-empty texts of one row group: the unit every reader of prepared data works in."""
    return [t for t in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist() if t]


def _iter_parquet_texts(path, doc_cap=None):
    pf = pq.ParquetFile(path)
    for rg in range(pf.num_row_groups):
        for text in _row_group_texts(pf, rg):
            yield text[:doc_cap] if doc_cap else text


# ---------------------------------------------------------------------------
# Data source 1: climbmix shards over HTTP
# ---------------------------------------------------------------------------

def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def network_reachable(base_url: str = BASE_URL, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when the data server answers at all (even with an HTTP error)."""
    try:
        req = urllib.request.Request(f"{base_url}/{shard_name(VAL_SHARD)}", method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def download_shard(index: int, dest_dir: Path, base_url: str = BASE_URL,
                   attempts: int = DOWNLOAD_ATTEMPTS, backoff_s: float = DOWNLOAD_BACKOFF_S) -> Path:
    """Download one shard to a temporary name, verify it, then rename; retries with backoff."""
    final = dest_dir / shard_name(index)
    if final.exists():
        try:
            verify_parquet(final)
            return final
        except HarnessError:
            final.unlink()  # a corrupt leftover: fetch it again
    url = f"{base_url}/{shard_name(index)}"
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    last_error = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:
                expected = resp.headers.get("Content-Length")
                written = 0
                while block := resp.read(1 << 20):
                    f.write(block)
                    written += len(block)
            if expected is not None and written != int(expected):
                raise HarnessError(f"truncated download ({written} of {expected} bytes)")
            verify_parquet(tmp, read_all=True)
            os.replace(tmp, final)
            return final
        except (urllib.error.URLError, http.client.HTTPException, OSError, HarnessError) as e:
            last_error = e
            tmp.unlink(missing_ok=True)
            print(f"  {shard_name(index)}: attempt {attempt + 1}/{attempts} failed: {e}", file=sys.stderr)
    raise HarnessError(f"could not download {url} after {attempts} attempts ({last_error}); "
                       f"check the network, or use --data PATH / --offline")


def download_climbmix(num_shards: int, base_url: str = BASE_URL, **kwargs):
    if not 1 <= num_shards <= MAX_SHARD:
        raise HarnessError(f"--num-shards must be between 1 and {MAX_SHARD}, got {num_shards}")
    dest = DATA_DIR / "climbmix"
    dest.mkdir(parents=True, exist_ok=True)
    indices = list(range(num_shards)) + [VAL_SHARD]
    print(f"downloading {num_shards} train shards + val shard {VAL_SHARD} from {base_url} -> {dest}")
    with ThreadPoolExecutor(max_workers=min(DOWNLOAD_WORKERS, len(indices))) as pool:
        futures = {i: pool.submit(download_shard, i, dest, base_url, **kwargs) for i in indices}
    errors = []
    for i, fut in futures.items():
        if fut.exception() is not None:
            errors.append(str(fut.exception()))
    if errors:
        raise HarnessError(f"{len(errors)} shard(s) failed: {errors[0]}")
    paths = {i: fut.result() for i, fut in futures.items()}
    return [paths[i] for i in range(num_shards)], [paths[VAL_SHARD]]


# ---------------------------------------------------------------------------
# Data sources 2 and 3: the user's corpus (--data) or the offline smoke-test corpus
# ---------------------------------------------------------------------------

def _txt_documents(text: str) -> list:
    """A .txt file is one document, or, when long, paragraphs grouped into ~TXT_DOC_CHARS documents."""
    text = text.strip()
    if len(text) <= TXT_DOC_CHARS:
        return [text] if text else []
    docs, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        if current and len(current) + len(para) > TXT_DOC_CHARS:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current.strip():
        docs.append(current)
    return docs


class _NotText(Exception):
    """A --data file whose bytes are not UTF-8 text: it is skipped (and named), not read."""


def _read_utf8(path: Path) -> str:
    """The text of a .txt / .jsonl file, strictly UTF-8 (a BOM is dropped). Bytes that are not UTF-8
    are never guessed at: Latin-1 would "decode" any binary file, so such a file is skipped with the
    reason, and the user converts it (iconv) if it was text after all."""
    data = path.read_bytes()
    if b"\0" in data:
        raise _NotText("binary, not text (it contains NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _NotText(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); if it is text in "
                       f"another encoding, convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _jsonl_documents(path: Path) -> list:
    docs = []
    # split at "\n" only: str.splitlines also splits at U+2028 and other separators a JSON string may hold
    for lineno, line in enumerate(_read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise HarnessError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            docs.append(text)
    return docs


def _file_documents(path: Path) -> list:
    """The documents of one --data file; _NotText if it is skipped, HarnessError if it is broken."""
    if path.suffix == ".txt":
        return _txt_documents(_read_utf8(path))
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    verify_parquet(path)
    return list(_iter_parquet_texts(path))


NO_TEXT = "no text (empty, whitespace only, or no non-empty 'text' field / column)"
SKIPPED_LISTED = 20  # skipped --data files named one by one; past that they are counted, so a huge
                     # directory of stray files does not bury the summary


@dataclass
class UserCorpus:
    """What --data gave: the documents (in sorted file order) and an account of every file looked at."""
    root: Path
    docs: list
    read: list      # (path, bytes) of every file that gave documents
    skipped: list   # (path, why) of every .txt / .jsonl / .parquet file that gave none
    ignored: dict   # suffix -> number of files of a type prepare.py does not read

    def report(self) -> list:
        """The lines prepare.py prints: what was read, each skipped file and why, what was ignored."""
        size = sum(n for _, n in self.read)
        lines = [f"--data {self.root}: read {len(self.docs):,} documents from {len(self.read)} file(s), "
                 f"{size:,} bytes; skipped {len(self.skipped)} file(s)"]
        lines += [f"  skipped {path}: {why}" for path, why in self.skipped[:SKIPPED_LISTED]]
        if len(self.skipped) > SKIPPED_LISTED:
            lines.append(f"  ... and {len(self.skipped) - SKIPPED_LISTED} more skipped file(s)")
        if self.ignored:
            lines.append(f"  ignored {sum(self.ignored.values())} file(s) of other types ({_suffix_counts(self.ignored)}); "
                         f"prepare.py reads {', '.join(USER_DATA_SUFFIXES)}")
        return lines


def _suffix_counts(counts: dict) -> str:
    return ", ".join(f"{suffix or 'no suffix'}: {n}" for suffix, n in sorted(counts.items()))


def read_user_corpus(path) -> UserCorpus:
    """Read a --data file or directory of .txt / .jsonl / .parquet. Files that are not UTF-8 text or
    hold no text are skipped and accounted for; HarnessError when nothing usable remains, or a file is
    broken in its own format (a bad JSON line, a corrupt parquet file). Touches nothing in the cache."""
    root = Path(path).expanduser()
    if not root.exists():
        raise HarnessError(f"--data {path}: no such file or directory")
    ignored = {}
    if root.is_file():
        if root.suffix not in USER_DATA_SUFFIXES:
            raise HarnessError(f"--data {path}: unsupported file type {root.suffix!r}; use {', '.join(USER_DATA_SUFFIXES)}")
        files = [root]
    else:
        files = []
        for p in sorted(p for p in root.rglob("*") if p.is_file()):
            if p.suffix in USER_DATA_SUFFIXES:
                files.append(p)
            else:
                ignored[p.suffix] = ignored.get(p.suffix, 0) + 1
        if not files:
            found = f"it has {sum(ignored.values())} other file(s): {_suffix_counts(ignored)}" if ignored else "it is empty"
            raise HarnessError(f"--data {path}: no {', '.join(USER_DATA_SUFFIXES)} files in this directory ({found})")
    docs, read, skipped = [], [], []
    for f in files:
        try:
            file_docs = _file_documents(f)
        except _NotText as e:
            skipped.append((f, str(e)))
            continue
        except OSError as e:
            raise HarnessError(f"--data: cannot read {f}: {e.strerror or e}") from None
        if file_docs:
            docs += file_docs
            read.append((f, f.stat().st_size))
        else:
            skipped.append((f, NO_TEXT))
    if not docs:
        listed = "; ".join(f"{p}: {why}" for p, why in skipped[:SKIPPED_LISTED])
        more = f"; and {len(skipped) - SKIPPED_LISTED} more" if len(skipped) > SKIPPED_LISTED else ""
        raise HarnessError(f"--data {path}: no text found in {len(files)} file(s): {listed}{more} "
                           f"(.txt and .jsonl must be UTF-8; .jsonl records need a 'text' field, "
                           f".parquet files a 'text' column)")
    return UserCorpus(root=root, docs=docs, read=read, skipped=skipped, ignored=ignored)


def read_user_documents(path) -> list:
    """All documents of a --data file or directory, in sorted file order (read_user_corpus's)."""
    return read_user_corpus(path).docs


def offline_documents() -> list:
    """Text every Python installation has: pydoc's topic help and the standard library's docstrings."""
    import ast
    import sysconfig
    import pydoc_data.topics
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately not valid Python 3 / UTF-8
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:  # one-liners teach the tokenizer nothing
                    docs.append(doc)
    return docs


def split_documents(docs: list, val_fraction: float = VAL_FRACTION):
    """Deterministic train/val split by content hash: the same corpus always gives the same split, in
    any file order, and copies of one text always land on the same side."""
    if len(docs) < 2:
        raise HarnessError(f"need at least 2 documents to split into train and val, found {len(docs)}")
    digests = [hashlib.blake2b(d.encode(), digest_size=8).digest() for d in docs]
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    cutoff = sorted(digests)[n_val - 1]  # val = the documents with the n_val smallest hashes
    train = [d for d, h in zip(docs, digests) if h > cutoff]
    val = [d for d, h in zip(docs, digests) if h <= cutoff]
    if not train:
        raise HarnessError("every document is a copy of the same text: nothing left to train on")
    return train, val


def write_local_corpus(source: str, train: list, val: list):
    """Write the split documents as parquet under DATA_DIR/<source>, replacing what was there."""
    dest = DATA_DIR / source
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.parquet"):
        old.unlink()
    train_paths = []
    for k in range(0, len(train), ROWS_PER_FILE):
        path = dest / f"train_{k // ROWS_PER_FILE:05d}.parquet"
        _write_parquet(path, train[k:k + ROWS_PER_FILE])
        train_paths.append(path)
    val_path = dest / "val.parquet"
    _write_parquet(val_path, val)
    return train_paths, [val_path]


# ---------------------------------------------------------------------------
# Tokenizer: trained with rustbpe, used through tiktoken
# ---------------------------------------------------------------------------

def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE, tokenizer_dir: Path = None) -> Path:
    """Train BPE on an iterable of strings; save tokenizer.pkl and token_bytes.npy."""
    import rustbpe
    import tiktoken
    tokenizer_dir = Path(tokenizer_dir or TOKENIZER_DIR)
    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:
        raise HarnessError(f"vocab size {vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS)}")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), n_merged, pattern=SPLIT_PATTERN)
    if bpe.vocab_size < n_merged:
        raise HarnessError(f"too little text for a {vocab_size}-token vocabulary: it supports only "
                           f"{bpe.vocab_size + len(SPECIAL_TOKENS)} tokens; add text or pass a smaller --vocab-size")
    ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
    specials = {tok: n_merged + i for i, tok in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="autoresearch", pat_str=bpe.get_pattern(),
                            mergeable_ranks=ranks, special_tokens=specials)
    sample = "Round-trip check: 12345 héllo\n\tworld 🙂"
    if enc.decode(enc.encode_ordinary(sample)) != sample:
        raise HarnessError("trained tokenizer does not round-trip text; this is a bug in prepare.py")
    # bits per byte needs each token's UTF-8 length; special tokens count 0 and are excluded
    token_bytes = np.zeros(n_merged + len(SPECIAL_TOKENS), dtype=np.int32)
    for b, r in ranks.items():
        token_bytes[r] = len(b)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    state = {"pattern": enc._pat_str, "mergeable_ranks": ranks, "special_tokens": specials}
    with open(tokenizer_dir / "tokenizer.pkl.tmp", "wb") as f:
        pickle.dump(state, f)
    os.replace(tokenizer_dir / "tokenizer.pkl.tmp", tokenizer_dir / "tokenizer.pkl")
    np.save(tokenizer_dir / "token_bytes.npy", token_bytes)
    return tokenizer_dir / "tokenizer.pkl"


class Tokenizer:
    """Thin wrapper around a tiktoken Encoding trained by prepare.py."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        import tiktoken
        path = Path(tokenizer_dir or TOKENIZER_DIR) / "tokenizer.pkl"
        if not path.exists():
            raise HarnessError(f"no tokenizer at {path}: run `uv run prepare.py` first")
        with open(path, "rb") as f:
            state = pickle.load(f)
        return cls(tiktoken.Encoding(name="autoresearch", pat_str=state["pattern"],
                                     mergeable_ranks=state["mergeable_ranks"],
                                     special_tokens=state["special_tokens"]))

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Encode a string (-> list of ids) or a list of strings (-> list of lists); special tokens as text."""
        head = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text)
        return [head + ids for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids) -> str:
        return self.enc.decode(ids)


def get_token_bytes(device="cpu", tokenizer_dir=None):
    import torch
    path = Path(tokenizer_dir or TOKENIZER_DIR) / "token_bytes.npy"
    if not path.exists():
        raise HarnessError(f"no {path}: run `uv run prepare.py` first")
    return torch.from_numpy(np.load(path).astype(np.int64)).to(device)


# ---------------------------------------------------------------------------
# Manifest: what was prepared, so every run can say which data it used
# ---------------------------------------------------------------------------

def load_manifest(path: Path = None) -> dict:
    path = Path(path or MANIFEST_PATH)
    if not path.exists():
        raise HarnessError(f"no prepared data ({path} is missing): run `uv run prepare.py` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HarnessError(f"{path} is corrupt ({e.msg}): run `uv run prepare.py` again") from None


def _file_entry(path: Path, tokenizer: Tokenizer, sha256: str) -> dict:
    """Manifest entry of a prepared file (already verified when downloaded or written)."""
    n_tokens = 0
    pf = pq.ParquetFile(path)
    for rg in range(pf.num_row_groups):
        n_tokens += sum(len(ids) + 1 for ids in tokenizer.encode(_row_group_texts(pf, rg)))  # +1: BOS per doc
    return {"path": str(path.relative_to(CACHE_DIR)), "bytes": path.stat().st_size,
            "sha256": sha256, "rows": pf.metadata.num_rows, "tokens": n_tokens}


def data_label(manifest: dict) -> str:
    """How every output names the data: the offline corpus is always flagged as a smoke test."""
    if manifest.get("smoke_test"):
        return f"{manifest['source']} (SMOKE-TEST corpus, not for research)"
    return manifest["source"]


def build_manifest(source: str, train_paths, val_paths, description: str, hashes: dict) -> dict:
    tokenizer = Tokenizer.from_directory()
    manifest = {
        "source": source,
        "smoke_test": source == "offline",
        "description": description,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": sha256_file(TOKENIZER_DIR / "tokenizer.pkl"),
        "token_bytes_sha256": sha256_file(TOKENIZER_DIR / "token_bytes.npy"),
        "train_files": [_file_entry(p, tokenizer, hashes[p]) for p in train_paths],
        "val_files": [_file_entry(p, tokenizer, hashes[p]) for p in val_paths],
    }
    manifest["train_tokens"] = sum(f["tokens"] for f in manifest["train_files"])
    manifest["val_tokens"] = sum(f["tokens"] for f in manifest["val_files"])
    # the hash covers content only (not the creation time), so re-preparing the same data keeps it
    manifest["manifest_hash"] = schema.manifest_hash(manifest)
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return manifest


def prepare(source: str, num_shards: int = DEFAULT_NUM_SHARDS, data_path=None,
            vocab_size: int = VOCAB_SIZE) -> dict:
    """Build data, tokenizer and manifest in CACHE_DIR; returns the manifest.

    The input is read and checked before anything in the cache changes, so a refused call (a bad
    --data, a failed download) leaves the previous preparation as it was, manifest included."""
    if source == "climbmix":
        # adds shards beside the ones there; a shard that verifies is never rewritten
        train_paths, val_paths = download_climbmix(num_shards)
        description = f"climbmix-400b-shuffle, {num_shards} train shards + val shard {VAL_SHARD}"
    elif source == "custom":
        corpus = read_user_corpus(data_path)
        print("\n".join(corpus.report()))
        docs = corpus.docs
        split = split_documents(docs)
        description = f"user corpus from {corpus.root.resolve()} ({len(docs)} documents)"
    elif source == "offline":
        docs = offline_documents()
        split = split_documents(docs)
        description = (f"offline SMOKE-TEST corpus: Python {sys.version.split()[0]} pydoc topics and stdlib "
                       f"docstrings ({len(docs)} documents); fine for trying the loop, useless for research")
    else:
        raise ValueError(f"unknown source {source!r}")

    # From here on the cache changes. The manifest is what train.py trusts: remove it first, so a
    # prepare that fails half way leaves "run prepare.py" behind, never an old manifest describing new files.
    MANIFEST_PATH.unlink(missing_ok=True)
    if source != "climbmix":
        train_paths, val_paths = write_local_corpus(source, *split)

    hashes = {p: sha256_file(p) for p in [*train_paths, *val_paths]}
    # what the tokenizer depends on: when none of it changed, retraining (minutes on climbmix) is skipped
    trained_on = {"vocab_size": vocab_size, "pattern": SPLIT_PATTERN, "special_tokens": SPECIAL_TOKENS,
                  "max_chars": TOKENIZER_MAX_CHARS, "doc_cap": TOKENIZER_DOC_CAP,
                  "train_sha256": [hashes[p] for p in train_paths]}
    stamp = TOKENIZER_DIR / "trained_on.json"
    if (stamp.exists() and json.loads(stamp.read_text()) == trained_on
            and (TOKENIZER_DIR / "tokenizer.pkl").exists() and (TOKENIZER_DIR / "token_bytes.npy").exists()):
        print(f"tokenizer is up to date with this data, keeping it: {TOKENIZER_DIR}")
    else:
        stamp.unlink(missing_ok=True)
        _train_tokenizer_on(train_paths, vocab_size)
        stamp.write_text(json.dumps(trained_on, indent=2) + "\n")
    manifest = build_manifest(source, train_paths, val_paths, description, hashes)
    tmp = MANIFEST_PATH.with_name(MANIFEST_PATH.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, MANIFEST_PATH)
    return manifest


def _train_tokenizer_on(train_paths, vocab_size: int):
    print(f"training a {vocab_size}-token BPE tokenizer on {len(train_paths)} train file(s)...")
    t0 = time.time()

    def tokenizer_texts():
        budget = TOKENIZER_MAX_CHARS
        for p in train_paths:
            for text in _iter_parquet_texts(p, doc_cap=TOKENIZER_DOC_CAP):
                yield text
                budget -= len(text)
                if budget <= 0:
                    return

    train_tokenizer(tokenizer_texts(), vocab_size)
    print(f"tokenizer trained in {time.time() - t0:.1f}s -> {TOKENIZER_DIR}")


# ---------------------------------------------------------------------------
# Runtime: dataloader (BOS-aligned best-fit packing, no padding)
# ---------------------------------------------------------------------------

def split_files(split: str, manifest: dict = None) -> list:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    manifest = manifest or load_manifest()
    return [CACHE_DIR / f["path"] for f in manifest[f"{split}_files"]]


def _document_batches(split: str, seed: int):
    """Yield (list of texts, epoch) forever, one parquet row group at a time.
    Train visits row groups in a seed-dependent order that changes every epoch; val reads in file order."""
    files = split_files(split)
    parquet = {p: pq.ParquetFile(p) for p in files}
    units = [(p, rg) for p in files for rg in range(parquet[p].num_row_groups)]
    epoch = 1
    while True:
        order = list(units)
        if split == "train":
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for path, rg in order:
            yield _row_group_texts(parquet[path], rg), epoch
        epoch += 1


def packed_rows(tokenizer: Tokenizer, row_len: int, split: str, seed: int = 0, buffer_size: int = 1000):
    """Yield (row, epoch) forever: numpy int64 rows of exactly row_len tokens.

    Every row starts at a document start (BOS). Documents are placed best-fit (the largest that fits
    the space left); when none fits, the shortest is cropped to fill the row, so there is no padding."""
    bos = tokenizer.get_bos_token_id()
    docs = _document_batches(split, seed)
    buffer = []   # sorted by length: (length, tiebreak, ids)
    tiebreak = count()
    epoch = 1
    while True:
        row = np.empty(row_len, dtype=np.int64)
        pos = 0
        while pos < row_len:
            while len(buffer) < buffer_size:
                texts, epoch = next(docs)
                for ids in tokenizer.encode(texts, prepend=bos):
                    insort(buffer, (len(ids), next(tiebreak), ids))
            space = row_len - pos
            i = bisect_right(buffer, (space, math.inf)) - 1
            n, _, ids = buffer.pop(i if i >= 0 else 0)
            take = min(n, space)
            row[pos:pos + take] = ids[:take]
            pos += take
        yield row, epoch


def make_dataloader(tokenizer: Tokenizer, B: int, T: int, split: str, device="cpu", seed: int = 0,
                    buffer_size: int = 1000):
    """Yield (inputs, targets, epoch) forever: contiguous (B, T) int64 tensors on `device`, targets =
    inputs shifted by one.

    On CUDA the rows are written straight into one preallocated pinned host buffer (inputs then
    targets, so each is contiguous) and copied to the GPU without blocking the host; before the
    buffer is refilled, the host waits for the previous copy only, not for the training step."""
    import torch
    if split != "train":
        raise HarnessError(f"make_dataloader serves the train split only (asked for {split!r}): the validation "
                           f"rows are the harness's, read by evaluate_val alone")
    device = torch.device(device)
    rows_iter = packed_rows(tokenizer, T + 1, split, seed, buffer_size)
    cuda = device.type == "cuda"
    host = torch.empty((2, B, T), dtype=torch.int64, pin_memory=cuda)
    host_np = host.numpy()
    copied = torch.cuda.Event() if cuda else None
    while True:
        if cuda:
            copied.synchronize()  # the previous batch has left the pinned buffer
        for b in range(B):
            row, epoch = next(rows_iter)
            host_np[0, b] = row[:-1]
            host_np[1, b] = row[1:]
        if cuda:
            batch = host.to(device, non_blocking=True)
            copied.record()
        else:
            batch = host.clone()  # a fresh tensor per batch: a caller may keep the previous one
        yield batch[0], batch[1], epoch


# ---------------------------------------------------------------------------
# Runtime: the metric. Do not change: it is what makes runs comparable.
# ---------------------------------------------------------------------------

_VAL_ROWS = {}  # (T, n_rows) -> int64 CPU tensor; the val slice is tokenized once per process (curve points)


class _EvaluationClock:
    """Seconds this process spent in evaluate_val: the logger's wall-clock stamps subtract them, as
    train.py's training clock leaves evaluations out."""

    def __init__(self):
        self.seconds = 0.0


EVALUATION_CLOCK = _EvaluationClock()


def default_eval_tokens(device_type: str, curve: bool = False) -> int:
    if device_type == "cuda":
        return VAL_CURVE_TOKENS if curve else EVAL_TOKENS
    return CPU_VAL_CURVE_TOKENS if curve else CPU_EVAL_TOKENS


def eval_rows(device_type: str, curve: bool = False) -> int:
    """Rows of MAX_SEQ_LEN tokens behind one evaluation (the final one, or a validation-curve point)."""
    return max(1, default_eval_tokens(device_type, curve) // MAX_SEQ_LEN)


def eval_batch_rows(device_type: str, batch_size: int) -> list:
    """The distinct batch sizes (rows) that the curve and final evaluations feed the model, sorted:
    each is one compiled graph, to be warmed before the training clock starts (warm_up_evaluation)."""
    sizes = set()
    for curve in (True, False):
        n = eval_rows(device_type, curve)
        sizes.update(min(batch_size, n - i) for i in range(0, n, batch_size))
    return sorted(sizes)


def warm_up_evaluation(model, tokenizer: Tokenizer, batch_size: int):
    """Run `model` once on every batch shape evaluate_val will use (eval mode, no grad, logits), so an
    evaluation in the middle of the run never compiles a graph. Call it with the model in eval mode
    and under the autocast the evaluations use; it measures nothing."""
    import torch
    device = next(model.parameters()).device
    sizes = eval_batch_rows(device.type, batch_size)
    rows = val_rows(tokenizer, sizes[-1])
    with torch.no_grad():
        for n in sizes:
            chunk = rows[:n].to(device)
            model(chunk[:, :-1].contiguous())


def val_rows(tokenizer: Tokenizer, n_rows: int, T: int = MAX_SEQ_LEN, fresh: bool = False):
    """The first n_rows packed rows of the val split; fresh: read from the val files now, bypassing the
    per-process cache (the final evaluation: nothing written into the cache can reach its number)."""
    import torch
    key = (T, n_rows)
    if fresh or key not in _VAL_ROWS:
        rows = packed_rows(tokenizer, T + 1, "val")
        table = torch.from_numpy(np.stack([next(rows)[0] for _ in range(n_rows)]))
        if fresh:
            return table
        _VAL_ROWS[key] = table
    return _VAL_ROWS[key]


def evaluate_val(model, tokenizer: Tokenizer, batch_size: int, curve: bool = False, fresh: bool = False):
    """(bits per byte, nats per token) of `model` on the first rows of the val split, at MAX_SEQ_LEN.

    `model(x)` must return logits (B, T, vocab); the loss is computed here, by the harness, as the
    cross-entropy of those logits with the next tokens (the model never sees the targets). Special
    tokens (BOS) have 0 bytes and are excluded from all sums, so bpb does not depend on the vocabulary
    size; nats per token is in the units of train/loss, for the train/val gap. `curve=True` evaluates
    the small fixed slice used for the validation curve during training; `fresh=True` reads the rows
    from disk (val_rows). Its time is added to EVALUATION_CLOCK."""
    started = time.monotonic()
    try:
        return _evaluate_val(model, tokenizer, batch_size, curve, fresh)
    finally:
        EVALUATION_CLOCK.seconds += time.monotonic() - started


def _evaluate_val(model, tokenizer: Tokenizer, batch_size: int, curve: bool, fresh: bool):
    import torch
    device = next(model.parameters()).device
    n_rows = eval_rows(device.type, curve)
    rows = val_rows(tokenizer, n_rows, fresh=fresh)
    token_bytes = get_token_bytes(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    total_tokens = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for i in range(0, n_rows, batch_size):
            chunk = rows[i:i + batch_size].to(device)
            x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()  # the layout training batches have
            loss = next_token_nats(model(x), y)
            nbytes = token_bytes[y.reshape(-1)]
            total_nats += (loss.double() * (nbytes > 0)).sum()
            total_bytes += nbytes.sum()
            total_tokens += (nbytes > 0).sum()
    bpb, nats_per_token = torch.stack([total_nats / (math.log(2) * total_bytes.double()),
                                       total_nats / total_tokens.double()]).tolist()  # one sync
    return bpb, nats_per_token


def next_token_nats(logits, y):
    """Per-token cross-entropy (nats, flat, fp32) of logits (B, T, V) against the next tokens y (B, T)."""
    import torch.nn.functional as F
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(y.shape):
        raise HarnessError(f"the model returned {tuple(logits.shape)} for inputs {tuple(y.shape)}: model(x) must "
                           f"return logits of shape (B, T, vocab)")
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")


CAUSALITY_TOLERANCE = 1e-2  # largest |change| of an earlier logit allowed; a model that reads ahead moves them by O(1)


def causality_probe(model, tokenizer: Tokenizer, batch_size: int) -> dict:
    """Do the logits at positions <= t stay put when only the tokens after t change? A language model's
    must: one that reads the future (the targets) would score an impossible val_bpb. Run on the smallest
    evaluation batch shape (a graph already compiled), with the model in eval mode under the eval autocast."""
    import torch
    device = next(model.parameters()).device
    n = eval_batch_rows(device.type, batch_size)[0]
    x = val_rows(tokenizer, n, fresh=True)[:, :-1].contiguous().to(device)
    t = x.size(1) // 2
    changed = x.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % tokenizer.get_vocab_size()
    with torch.no_grad():
        before, after = model(x)[:, :t + 1].float(), model(changed)[:, :t + 1].float()
    change = (before - after).abs().max().item()
    return {"ok": change <= CAUSALITY_TOLERANCE, "max_change": change, "position": t, "rows": n}


def evaluate_bpb(model, tokenizer: Tokenizer, batch_size: int, curve: bool = False) -> float:
    """The metric: bits per byte on the val split (see evaluate_val)."""
    return evaluate_val(model, tokenizer, batch_size, curve)[0]


# ---------------------------------------------------------------------------
# Runtime: devices
# ---------------------------------------------------------------------------

# Dense bf16 tensor-core peak FLOP/s (NVIDIA datasheets: the figure without sparsity, which is half
# the headline one) by the exact name CUDA reports. Exact, because names overlap ("NVIDIA L4" and
# "NVIDIA L40", the H100's SXM, PCIe and NVL parts); MFU is 0 on a GPU not listed here.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989.5e12,   # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA H200": 989.5e12,             # H200 SXM
    "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA H800": 989.5e12,             # H800 SXM5
    "NVIDIA H800 PCIe": 756e12,
    "NVIDIA H20": 148e12,
    "NVIDIA GH200 480GB": 989.5e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A800-SXM4-80GB": 312e12,
    "NVIDIA A800 80GB PCIe": 312e12,
    "NVIDIA L40S": 362.05e12,
    "NVIDIA L40": 181.05e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "NVIDIA GeForce RTX 4090": 165.2e12,  # with fp32 accumulation, as torch's bf16 matmuls use
}

# Linux driver a CUDA major version needs (CUDA minor-version compatibility: any 13.x runs on >= 580).
CUDA_MIN_DRIVER = {13: 580, 12: 525, 11: 450}
ALLOW_CPU_ENV = "AUTORESEARCH_ALLOW_CPU"   # "1": train the CPU configuration although a GPU is present
NVIDIA_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0")
NVIDIA_DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"


def nvidia_driver_version():
    """The NVIDIA driver's version ("580.65.06") where nvidia-smi answers or the kernel module says it;
    "" where only an NVIDIA device file shows a GPU; None where nothing shows an NVIDIA GPU."""
    import shutil
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            versions = out.stdout.split()
            if out.returncode == 0 and versions:
                return versions[0]
        except subprocess.TimeoutExpired:
            pass  # a hung nvidia-smi: fall back to the kernel module's file and the device files
    try:
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", Path(NVIDIA_DRIVER_VERSION_FILE).read_text())
        if found:
            return found.group(1)
    except OSError:
        pass  # no NVIDIA kernel module loaded
    return "" if any(os.path.exists(f) for f in NVIDIA_DEVICE_FILES) else None


def cuda_unusable_message(torch_version: str, torch_cuda, driver: str, init_error) -> str:
    """Why CUDA is unusable on a machine with an NVIDIA GPU, and what to do, in one line."""
    head = f"an NVIDIA GPU is present (driver {driver or 'not answering'}) but torch {torch_version} cannot use it"
    fix = ("upgrade the NVIDIA driver, or install a torch built for an older CUDA (README, 'GPU driver')")
    if not torch_cuda:
        cause, fix = "it is a CPU-only build", "install a CUDA build of torch (README, 'GPU driver')"
    else:
        major = int(str(torch_cuda).split(".")[0])
        needed = CUDA_MIN_DRIVER.get(major)
        driver_major = int(driver.split(".")[0]) if driver[:1].isdigit() else None
        if needed and driver_major is not None and driver_major < needed:
            cause = f"its CUDA {torch_cuda} runtime needs driver >= {needed}"
        elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            cause = f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} may hide every GPU"
            fix = "unset CUDA_VISIBLE_DEVICES or name a GPU in it"
        else:
            cause = f"CUDA {torch_cuda} could not start"
            fix = "check `nvidia-smi` and the driver installation"
    said = f" (torch: {init_error})" if init_error else ""
    return (f"{head}: {cause}{said}. Fix: {fix}; or set {ALLOW_CPU_ENV}=1 to train the small CPU "
            f"configuration on this machine anyway")


def _cuda_init_error():
    """torch's own first line on why CUDA does not start, or None."""
    import torch
    try:
        torch.cuda.init()
    except (RuntimeError, AssertionError) as e:  # AssertionError: "Torch not compiled with CUDA enabled"
        lines = str(e).strip().splitlines()
        return lines[0] if lines else type(e).__name__
    return None


def autodetect_device():
    """cuda when usable; on a machine with an NVIDIA GPU that CUDA cannot use, a HarnessError naming the
    cause (never a silent CPU run), unless AUTORESEARCH_ALLOW_CPU=1; else mps or cpu."""
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda")
    driver = nvidia_driver_version()
    if driver is not None and os.environ.get(ALLOW_CPU_ENV) != "1":
        raise HarnessError(cuda_unusable_message(torch.__version__, torch.version.cuda, driver, _cuda_init_error()))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device):
    """Peak bf16 FLOP/s of `device`, or None where unknown (CPU, MPS, unlisted GPUs)."""
    import torch
    if device.type != "cuda":
        return None
    return PEAK_BF16_FLOPS.get(torch.cuda.get_device_name(device))


def peak_memory_mb(device) -> float:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def hardware_identity() -> str:
    """The device this process trains on, as the harness sees it: what every summary records as its
    `device` (a pool key), whatever train.py says."""
    try:
        import torch
    except ImportError as e:
        return f"unknown (torch does not import: {e})"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_description(device) -> str:
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


MAX_RECOMPILE_REASONS = 5  # guard failures quoted in a summary: enough to see the cause, short to read


def compile_counters() -> dict:
    """torch.compile's running totals in this process: graphs compiled, graph breaks, recompilations
    (a graph compiled again because a guard failed) and the first reasons for them. Take it before and
    after the training loop: a graph compiled inside the timed loop is a stall on the training clock."""
    from torch._dynamo.utils import counters, guard_failures
    reasons = [r for failures in guard_failures.values() for r in failures]
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": len(reasons), "recompile_reasons": [r.splitlines()[0] for r in reasons[:MAX_RECOMPILE_REASONS]]}


# ---------------------------------------------------------------------------
# Runtime: the run logger (metrics.jsonl + run_summary.json) and the watchdog
# ---------------------------------------------------------------------------

_UPPER = re.compile(r"[A-Z][A-Z0-9_]*")


def _jsonable(v):
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)


def capture_config(namespace: dict) -> dict:
    """Every UPPER_CASE constant of a module namespace (modules, classes and functions skipped)."""
    return {k: _jsonable(v) for k, v in sorted(namespace.items())
            if _UPPER.fullmatch(k) and not (callable(v) or type(v).__name__ == "module")}


def harness_hash() -> str:
    return schema.harness_hash(Path(__file__).resolve().parent)


def _bindings() -> dict:
    """{qualified name: what it is bound to} over the harness modules (this one and schema) and the classes
    they define; a function is identified with its code, defaults and keyword defaults, which can be
    replaced in place (`evaluate_val.__code__ = ...`) without rebinding its name."""
    import types

    def identity(value):
        if isinstance(value, types.FunctionType):
            return (value, value.__code__, value.__defaults__, value.__kwdefaults__)
        return (value,)

    found = {}
    for module in (sys.modules[__name__], schema):
        for name, value in vars(module).items():
            found[f"{module.__name__}.{name}"] = identity(value)
            if isinstance(value, type) and value.__module__ == module.__name__:
                for attr, member in vars(value).items():
                    found[f"{module.__name__}.{name}.{attr}"] = identity(member)
    return found


def harness_check(logger=None) -> dict:
    """Is the harness in this process as it was imported? {"ok", "changed"}: the names train.py rebound,
    added or whose code it replaced in prepare, schema or their classes (and methods shadowed on the
    logger instance). Written into the summary by evaluate_and_finish; analyze.py invalidates a run without it."""
    now = _bindings()
    changed = [name for name, bound in _PRISTINE.items()
               if name not in now or any(a is not b for a, b in zip(bound, now[name]))]
    changed += [name for name in now if name not in _PRISTINE and not name.endswith("._PRISTINE")]
    if logger is not None:
        changed += [f"logger.{name}" for name in vars(logger) if name in vars(RunLogger)]
    return {"ok": not changed, "changed": sorted(changed)[:20]}


def git_state(cwd="."):
    """(short commit, dirty) of the repository at cwd, or (None, None) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status.strip())


class RunLogger:
    """Writes metrics.jsonl (a fresh file per run, one flushed line per step) and run_summary.json.

    Created first thing in train.py: it deletes the previous run's outputs at once, so a crash can
    never leave an earlier summary behind to be mistaken for this run's result. An uncaught exception
    (or SIGTERM) writes a summary with status "crash"; `finish` writes the final one atomically."""

    def __init__(self, train_globals: dict, run_dir=".", t_start: float = None):
        import signal
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / RUN_METRICS
        self.summary_path = self.run_dir / RUN_SUMMARY
        # held until the process ends: a second train.py here is refused, and analyze.py waits for this one
        self._run_lock = open(self.run_dir / schema.RUN_LOCK_FILE, "a+")
        try:
            fcntl.flock(self._run_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._run_lock.seek(0)
            raise HarnessError(f"another train.py is running in {self.run_dir.resolve()} (pid "
                               f"{self._run_lock.read().strip() or '?'}): wait for it, or end it") from None
        self._run_lock.truncate(0)
        self._run_lock.write(f"{os.getpid()}\n")
        self._run_lock.flush()
        self.summary_path.unlink(missing_ok=True)
        self._clock_start = time.monotonic()  # the harness's own clock stamps (log_step)
        self._eval_start = EVALUATION_CLOCK.seconds
        self._metrics_hash, self._metrics_lines = hashlib.sha256(), 0  # what log_step wrote, for the seal
        self.t_start = t_start or time.time()
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t_start))
        self._globals = train_globals
        print(schema.log_stamp(self.started_at), flush=True)  # run.log's first line: whose log it is
        self._file = open(self.metrics_path, "w")
        self._lock = threading.Lock()
        self._last = None
        self.summary = None
        self.info = {}
        commit, dirty = git_state(self.run_dir)
        self.info.update(commit=commit, dirty=dirty)
        source = train_globals.get("__file__")  # the exact code that ran, so analyze.py can tell
        self.info["train_sha256"] = sha256_file(source) if source else None
        self._previous_hook = sys.excepthook
        sys.excepthook = self._excepthook
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    HARNESS_FIELDS = ("status", "val_bpb", "causality", "harness_check", "device", "harness_hash", "time_budget_s",
                      "started_at")

    def set(self, **fields):
        """Record summary fields as soon as they are known, so even a failure summary has them (not the
        ones only the harness writes)."""
        owned = sorted(set(fields) & set(self.HARNESS_FIELDS))
        if owned:
            raise HarnessError(f"run_summary.json's {', '.join(owned)}: written by the harness, not by train.py")
        self.info.update(fields)

    def log_step(self, record: dict):
        """Write one metrics.jsonl line: the record, stamped with the harness's wall clock and the time spent
        in evaluations so far (schema.HARNESS_STEP_KEYS), which train.py may not supply."""
        stamped = sorted(set(record) & set(schema.HARNESS_STEP_KEYS))
        if stamped:
            raise HarnessError(f"metrics keys {', '.join(stamped)}: stamped by the harness, not by train.py")
        record = {**record, schema.WALL_S: time.monotonic() - self._clock_start,
                  schema.EVAL_S: EVALUATION_CLOCK.seconds - self._eval_start}
        problems = schema.step_record_problems(record)
        if problems:
            raise HarnessError(f"metrics record of step {record.get(schema.STEP)} breaks the contract: {problems[:3]}")
        line = json.dumps(record) + "\n"
        self._file.write(line)
        self._file.flush()
        self._metrics_hash.update(line.encode())
        self._metrics_lines += 1
        self._last = record

    def evaluate_and_finish(self, model, batch_size: int, **fields) -> dict:
        """The end of a finished run, all the harness's: it checks that its own code is as imported
        (harness_check), evaluates the full slice with its own tokenizer and with rows read from disk now
        (nothing train.py cached, rebound or passed in reaches the number), probes causality, then writes
        and seals the summary. No caller supplies the number."""
        check = harness_check(self)
        tokenizer = Tokenizer.from_directory()
        val_bpb = evaluate_val(model, tokenizer, batch_size, fresh=True)[0]
        fields = dict(fields, val_bpb=val_bpb, harness_check=check,
                      causality=causality_probe(model, tokenizer, batch_size))
        return self._write("ok", fields, sealed_val_bpb=val_bpb)

    def finish(self, status: str, **fields) -> dict:
        """Write a failure's run_summary.json (first call wins: a watchdog and a crash cannot both write one).
        A finished run ends with evaluate_and_finish instead."""
        if status == "ok" or set(fields) & {"val_bpb", "causality", "harness_check"}:
            raise HarnessError("val_bpb is the harness's: end a finished run with "
                               "logger.evaluate_and_finish(model, batch_size, ...)")
        return self._write(status, fields)

    def _write(self, status: str, fields: dict, sealed_val_bpb=None) -> dict:
        assert status in schema.TRAIN_STATUSES, status
        with self._lock:
            if self.summary is not None:
                return self.summary
            last = self._last or {}
            summary = {k: None for k in schema.SUMMARY_KEYS}
            summary.update(num_steps=last.get(schema.STEP, -1) + 1, training_seconds=last.get(schema.TIME_S, 0.0))
            summary.update(self.info)
            summary.update(fields)
            summary.update(status=status, started_at=self.started_at, total_seconds=time.time() - self.t_start,
                           time_budget_s=TIME_BUDGET, harness_hash=harness_hash(), device=hardware_identity(),
                           config=capture_config(self._globals))
            try:
                manifest = load_manifest()
                summary["data"] = {"source": manifest["source"], "smoke_test": manifest["smoke_test"],
                                   "manifest_hash": manifest["manifest_hash"]}
            except HarnessError as e:
                summary["data"] = {"error": str(e)}
            text = json.dumps(summary, indent=2) + "\n"
            tmp = self.summary_path.with_name(self.summary_path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.summary_path)
            self._file.flush()
            self.summary = summary
            # the seal, outside the run directory: what the harness wrote, and the number it computed itself
            schema.write_seal(self.run_dir, self.started_at, text, self._metrics_hash.hexdigest(), self._metrics_lines,
                              sealed_val_bpb)
            return summary

    def _excepthook(self, etype, value, tb):
        self.finish("crash", error=f"{etype.__name__}: {value}")
        if isinstance(value, HarnessError):
            print(f"error: {value}", file=sys.stderr)
        else:
            self._previous_hook(etype, value, tb)

    def _on_sigterm(self, signum, frame):
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the crash summary short
        raise KeyboardInterrupt(f"terminated by SIGTERM after {time.time() - self.t_start:.0f} s: killed from "
                                f"outside (a tool or supervisor timeout, or a stop), not by an error in train.py")


class LayerStats:
    """Per-parameter-matrix gradient norm, weight norm and update-to-weight ratio of one optimizer step.

    Call `before_step()` after backward and `after_step()` after optimizer.step(); all norms are
    computed on the device and copied to the host together, so a measurement costs one sync."""

    def __init__(self, model):
        self.named = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
        self._grad_norms = self._before = None

    def before_step(self):
        import torch
        params = [p for _, p in self.named]
        self._grad_norms = torch._foreach_norm([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        self._before = [p.detach().clone() for p in params]

    def after_step(self) -> dict:
        import torch
        params = [p.detach() for _, p in self.named]
        weight_norms = torch._foreach_norm(params)
        update_norms = torch._foreach_norm(torch._foreach_sub(params, self._before))
        table = torch.stack([torch.stack(self._grad_norms), torch.stack(weight_norms),
                             torch.stack(update_norms)]).float().cpu().tolist()  # the one sync
        self._grad_norms = self._before = None
        stats = {}
        for i, (name, _) in enumerate(self.named):
            grad, weight, update = table[0][i], table[1][i], table[2][i]
            stats[schema.layer_key(name, "grad_norm")] = grad
            stats[schema.layer_key(name, "weight_norm")] = weight
            stats[schema.layer_key(name, "update_ratio")] = update / weight if weight > 0 else 0.0
        return stats


class Watchdog:
    """Ends a run that has overrun its budget by a wide margin (a hang) with status "timeout"."""

    def __init__(self, logger: RunLogger, limit_s: float = None):
        self.logger = logger
        self.limit_s = limit_s or WATCHDOG_S
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def _watch(self):
        if self._done.wait(self.limit_s):
            return
        message = f"watchdog: run exceeded {self.limit_s:.0f}s of wall time (budget {TIME_BUDGET:.0f}s), killing it as hung"
        self.logger.finish("timeout", error=message)
        print(f"\nFAIL: {message}", file=sys.stderr, flush=True)
        os._exit(TIMEOUT_EXIT_CODE)

    def stop(self):
        self._done.set()


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for auto-log-research.")
    parser.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS,
                        help=f"climbmix train shards to download (default {DEFAULT_NUM_SHARDS})")
    parser.add_argument("--data", metavar="PATH", help="your own corpus: a .txt/.jsonl/.parquet file or a directory of them")
    parser.add_argument("--offline", action="store_true", help="use the built-in smoke-test corpus, no network")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help=f"BPE vocabulary (default {VOCAB_SIZE})")
    args = parser.parse_args(argv)
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        if args.data:
            source = "custom"
        elif args.offline:
            source = "offline"
        elif network_reachable():
            source = "climbmix"
        else:
            print(f"no network: cannot reach {BASE_URL}; falling back to the offline SMOKE-TEST corpus "
                  f"(not for research; use --data PATH for your own text)")
            source = "offline"
        manifest = prepare(source, args.num_shards, args.data, args.vocab_size)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"data: {data_label(manifest)}: {manifest['description']}")
    print(f"train tokens: {manifest['train_tokens']:,}  val tokens: {manifest['val_tokens']:,}  "
          f"vocab: {manifest['vocab_size']}  manifest: {MANIFEST_PATH} ({manifest['manifest_hash']})")
    return 0


_PRISTINE = _bindings()  # last: the harness as imported, before train.py can touch it (harness_check)

if __name__ == "__main__":
    sys.exit(main())
