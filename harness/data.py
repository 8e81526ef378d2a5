"""
The data prepare.py prepares: climbmix shards over HTTP, the user's own corpus (--data) or the
offline smoke-test corpus, split into train and val, the tokenizer trained on it, and manifest.json.
"""

import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from harness import contract, settings, tokenizer
from harness.contract import HarnessError


# climbmix-400b-shuffle (settings.DATA_URL): shard_06542 is the pinned val shard
MAX_SHARD = 6542
VAL_SHARD = MAX_SHARD
DEFAULT_NUM_SHARDS = 10
DOWNLOAD_WORKERS = 8
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_BACKOFF_S = 2.0      # doubles after every failed attempt: 2, 4, 8, 16 s
DOWNLOAD_TIMEOUT_S = 60       # per socket operation, not per file
PROBE_TIMEOUT_S = 10          # how long to wait before declaring the network absent

TRAINED_ON = "trained_on.json"  # what the tokenizer in the cache was trained on
TOKENIZER_MAX_CHARS = 1_000_000_000  # enough text for a stable 8k vocabulary, bounded prepare time
TOKENIZER_DOC_CAP = 10_000           # chars taken from one document, so no single doc dominates

USER_DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")
VAL_FRACTION = 0.1            # share of --data / offline documents held out for validation
# a long .txt is cut at paragraph breaks into documents of about this size
TXT_DOC_CHARS = 8_000
ROWS_PER_FILE = 50_000        # documents per prepared train parquet file
ROW_GROUP_SIZE = 1024         # documents per parquet row group: the dataloader's unit of shuffling


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def verify_parquet(path, read_all: bool = False) -> int:
    """Number of rows of a parquet file with a string `text` column; HarnessError if it is not one.
    The footer check catches truncation; read_all also decodes every page (for fresh downloads)."""
    try:
        pf = pq.ParquetFile(path)
        schema_ = pf.schema_arrow
        if "text" not in schema_.names:
            raise HarnessError(f"parquet file {path} has no 'text' column "
                               f"(columns: {schema_.names})")
        text_type = schema_.field("text").type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            raise HarnessError(f"parquet file {path}: the 'text' column holds {text_type}, "
                               f"not strings")
        if read_all:
            for rg in range(pf.num_row_groups):
                pf.read_row_group(rg, columns=["text"])
    except (pa.ArrowException, OSError) as e:
        raise HarnessError(f"corrupt parquet file {path}: {e}") from None
    return pf.metadata.num_rows


def _parquet_bytes(docs: list) -> bytes:
    table = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": docs}), table, row_group_size=ROW_GROUP_SIZE)
    return table.getvalue().to_pybytes()


def row_group_texts(pf: pq.ParquetFile, rg: int) -> list:
    """The non-empty texts of one row group: the unit every reader of prepared data works in."""
    return [t for t in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist() if t]


def _iter_parquet_texts(path, doc_cap=None):
    pf = pq.ParquetFile(path)
    for rg in range(pf.num_row_groups):
        for text in row_group_texts(pf, rg):
            yield text[:doc_cap] if doc_cap else text


# ---------------------------------------------------------------------------
# Data source 1: climbmix shards over HTTP
# ---------------------------------------------------------------------------

def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def network_reachable(base_url: str = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when the data server answers at all (even with an HTTP error)."""
    base_url = base_url or settings.DATA_URL
    try:
        req = urllib.request.Request(f"{base_url}/{shard_name(VAL_SHARD)}", method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def download_shard(index: int, dest_dir: Path, base_url: str = None,
                   attempts: int = DOWNLOAD_ATTEMPTS,
                   backoff_s: float = DOWNLOAD_BACKOFF_S) -> Path:
    """Download one shard to a temporary name, verify it, then rename; retries with backoff."""
    base_url = base_url or settings.DATA_URL
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
            with (urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp,
                  open(tmp, "wb") as f):
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
            print(f"  {shard_name(index)}: attempt {attempt + 1}/{attempts} failed: {e}",
                  file=sys.stderr)
    raise HarnessError(f"could not download {url} after {attempts} attempts ({last_error}); "
                       f"check the network, or use --data PATH / --offline")


def download_climbmix(num_shards: int, base_url: str = None, **kwargs):
    """Download the first `num_shards` train shards and the val shard (a verified shard is kept)."""
    base_url = base_url or settings.DATA_URL
    if not 1 <= num_shards <= MAX_SHARD:
        raise HarnessError(f"--num-shards must be between 1 and {MAX_SHARD}, got {num_shards}")
    dest = contract.cache_path(contract.DATA_DIR, "climbmix")
    dest.mkdir(parents=True, exist_ok=True)
    indices = list(range(num_shards)) + [VAL_SHARD]
    print(f"downloading {num_shards} train shards + val shard {VAL_SHARD} from {base_url} "
          f"-> {dest}")
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
    """A .txt file is one document, or, when long, paragraphs grouped into ~TXT_DOC_CHARS
    documents."""
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
        raise _NotText(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       f"if it is text in another encoding, convert it, e.g. "
                       f"`iconv -f latin1 -t utf-8`") from None


def _jsonl_documents(path: Path) -> list:
    docs = []
    # split at "\n" only: str.splitlines also splits at U+2028 and other separators a JSON string
    # may hold
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
    """What --data gave: the documents (in sorted file order) and an account of every file looked
    at."""
    root: Path
    docs: list
    read: list      # (path, bytes) of every file that gave documents
    skipped: list   # (path, why) of every .txt / .jsonl / .parquet file that gave none
    ignored: dict   # suffix -> number of files of a type prepare.py does not read

    def report(self) -> list:
        """The lines prepare.py prints: what was read, each skipped file and why, what was
        ignored."""
        size = sum(n for _, n in self.read)
        lines = [f"--data {self.root}: read {len(self.docs):,} documents from "
                 f"{len(self.read)} file(s), {size:,} bytes; skipped {len(self.skipped)} file(s)"]
        lines += [f"  skipped {path}: {why}" for path, why in self.skipped[:SKIPPED_LISTED]]
        if len(self.skipped) > SKIPPED_LISTED:
            lines.append(f"  ... and {len(self.skipped) - SKIPPED_LISTED} more skipped file(s)")
        if self.ignored:
            lines.append(f"  ignored {sum(self.ignored.values())} file(s) of other types "
                         f"({_suffix_counts(self.ignored)}); "
                         f"prepare.py reads {', '.join(USER_DATA_SUFFIXES)}")
        return lines


def _suffix_counts(counts: dict) -> str:
    return ", ".join(f"{suffix or 'no suffix'}: {n}" for suffix, n in sorted(counts.items()))


def read_user_corpus(path) -> UserCorpus:
    """Read a --data file or directory of .txt / .jsonl / .parquet. Files that are not UTF-8 text or
    hold no text are skipped and accounted for; HarnessError when nothing usable remains, or a file
    is broken in its own format (a bad JSON line, a corrupt parquet file). Touches nothing in the
    cache."""
    root = Path(path).expanduser()
    if not root.exists():
        raise HarnessError(f"--data {path}: no such file or directory")
    ignored = {}
    if root.is_file():
        if root.suffix not in USER_DATA_SUFFIXES:
            raise HarnessError(f"--data {path}: unsupported file type {root.suffix!r}; "
                               f"use {', '.join(USER_DATA_SUFFIXES)}")
        files = [root]
    else:
        files = []
        for p in sorted(p for p in root.rglob("*") if p.is_file()):
            if p.suffix in USER_DATA_SUFFIXES:
                files.append(p)
            else:
                ignored[p.suffix] = ignored.get(p.suffix, 0) + 1
        if not files:
            found = (f"it has {sum(ignored.values())} other file(s): {_suffix_counts(ignored)}"
                     if ignored else "it is empty")
            raise HarnessError(f"--data {path}: no {', '.join(USER_DATA_SUFFIXES)} files "
                               f"in this directory ({found})")
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
        more = (f"; and {len(skipped) - SKIPPED_LISTED} more" if len(skipped) > SKIPPED_LISTED
                else "")
        raise HarnessError(f"--data {path}: no text found in {len(files)} file(s): {listed}{more} "
                           f"(.txt and .jsonl must be UTF-8; .jsonl records need a 'text' field, "
                           f".parquet files a 'text' column)")
    return UserCorpus(root=root, docs=docs, read=read, skipped=skipped, ignored=ignored)


def read_user_documents(path) -> list:
    """All documents of a --data file or directory, in sorted file order (read_user_corpus's)."""
    return read_user_corpus(path).docs


def offline_documents() -> list:
    """Text every Python installation has: pydoc's topic help and the standard library's
    docstrings."""
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
    """Deterministic train/val split by content hash: the same corpus always gives the same split,
    in any file order, and copies of one text always land on the same side."""
    if len(docs) < 2:
        raise HarnessError(f"need at least 2 documents to split into train and val, "
                           f"found {len(docs)}")
    digests = [hashlib.blake2b(d.encode(), digest_size=8).digest() for d in docs]
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    cutoff = sorted(digests)[n_val - 1]  # val = the documents with the n_val smallest hashes
    train = [d for d, h in zip(docs, digests) if h > cutoff]
    val = [d for d, h in zip(docs, digests) if h <= cutoff]
    if not train:
        raise HarnessError("every document is a copy of the same text: nothing left to train on")
    return train, val


def local_corpus(source: str, train: list, val: list) -> tuple:
    """The parquet files of the split documents under the cache's data/<source>, as
    write_local_corpus writes them: ({train path: bytes}, {val path: bytes}), nothing written."""
    dest = contract.cache_path(contract.DATA_DIR, source)
    train_files = {dest / f"train_{k // ROWS_PER_FILE:05d}.parquet":
                   _parquet_bytes(train[k:k + ROWS_PER_FILE])
                   for k in range(0, len(train), ROWS_PER_FILE)}
    return train_files, {dest / "val.parquet": _parquet_bytes(val)}


def write_local_corpus(files: dict):
    """Write local_corpus's files ({path: bytes}), replacing what was in their folder."""
    dest = next(iter(files)).parent
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.parquet"):
        old.unlink()
    for path, content in files.items():
        contract.atomic_write(path, content, mode="wb")


# ---------------------------------------------------------------------------
# Manifest: what was prepared, so every run can say which data it used
# ---------------------------------------------------------------------------

def load_manifest(path: Path = None) -> dict:
    path = Path(path or contract.cache_path(contract.MANIFEST))
    if not path.exists():
        raise HarnessError(f"no prepared data ({path} is missing): run `uv run prepare.py` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HarnessError(f"{path} is corrupt ({e.msg}): run `uv run prepare.py` again") from None


def _file_entry(path: Path, enc: tokenizer.Tokenizer, sha256: str) -> dict:
    """Manifest entry of a prepared file (already verified when downloaded or written)."""
    n_tokens = 0
    pf = pq.ParquetFile(path)
    for rg in range(pf.num_row_groups):
        # +1: BOS per doc
        n_tokens += sum(len(ids) + 1 for ids in enc.encode(row_group_texts(pf, rg)))
    return {"path": str(path.relative_to(settings.CACHE_DIR)), "bytes": path.stat().st_size,
            "sha256": sha256, "rows": pf.metadata.num_rows, "tokens": n_tokens}


def data_label(manifest: dict) -> str:
    """How every output names the data: the offline corpus is always flagged as a smoke test."""
    if manifest.get("smoke_test"):
        return f"{manifest['source']} (SMOKE-TEST corpus, not for research)"
    return manifest["source"]


def build_manifest(source: str, train_paths, val_paths, description: str, hashes: dict) -> dict:
    enc = tokenizer.Tokenizer.from_directory()
    folder = tokenizer.tokenizer_dir()
    manifest = {
        "source": source,
        "smoke_test": source == "offline",
        "description": description,
        "vocab_size": enc.get_vocab_size(),
        "tokenizer_sha256": contract.sha256_file(folder / contract.TOKENIZER_FILE),
        "token_bytes_sha256": contract.sha256_file(folder / contract.TOKEN_BYTES_FILE),
        "train_files": [_file_entry(p, enc, hashes[p]) for p in train_paths],
        "val_files": [_file_entry(p, enc, hashes[p]) for p in val_paths],
    }
    manifest["train_tokens"] = sum(f["tokens"] for f in manifest["train_files"])
    manifest["val_tokens"] = sum(f["tokens"] for f in manifest["val_files"])
    # the hash covers content only (not the creation time), so re-preparing the same data keeps it
    manifest["manifest_hash"] = contract.manifest_hash(manifest)
    manifest["created"] = contract.stamp()
    return manifest


def prepare(source: str, num_shards: int = DEFAULT_NUM_SHARDS, data_path=None,
            vocab_size: int = settings.VOCAB_SIZE) -> dict:
    """Build data, tokenizer and manifest in the prepare cache; returns the manifest.

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
        description = (f"offline SMOKE-TEST corpus: Python {sys.version.split()[0]} pydoc topics "
                       f"and stdlib docstrings ({len(docs)} documents); fine for trying the loop, "
                       f"useless for research")
    else:
        raise ValueError(f"unknown source {source!r}")

    if source == "climbmix":
        hashes = {p: contract.sha256_file(p) for p in [*train_paths, *val_paths]}
    else:
        train_files, val_files = local_corpus(source, *split)
        train_paths, val_paths = list(train_files), list(val_files)
        hashes = {p: contract.sha256_bytes(b) for p, b in {**train_files, **val_files}.items()}
    # what the tokenizer depends on: when none of it changed, retraining (minutes on climbmix) is
    # skipped
    trained_on = {"vocab_size": vocab_size, "pattern": tokenizer.SPLIT_PATTERN,
                  "special_tokens": tokenizer.SPECIAL_TOKENS,
                  "max_chars": TOKENIZER_MAX_CHARS, "doc_cap": TOKENIZER_DOC_CAP,
                  "train_sha256": [hashes[p] for p in train_paths]}
    kept = prepared_already(source, hashes, trained_on)
    if kept is not None:  # nothing is written: a read-only (shared) cache works
        print(f"already prepared in {settings.CACHE_DIR} ({data_label(kept)}): nothing to change")
        return kept

    # From here on the cache changes. The manifest is what train.py trusts: remove it first, so a
    # prepare that fails half way leaves "run prepare.py" behind, never an old manifest describing
    # new files.
    manifest_path = contract.cache_path(contract.MANIFEST)
    manifest_path.unlink(missing_ok=True)
    if source != "climbmix":
        write_local_corpus({**train_files, **val_files})
    _tokenizer_for(train_paths, trained_on)
    manifest = build_manifest(source, train_paths, val_paths, description, hashes)
    contract.atomic_write(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _tokenizer_for(train_paths, trained_on: dict):
    """Keep the cache's tokenizer when it was trained as `trained_on` says, else train it anew."""
    folder = tokenizer.tokenizer_dir()
    stamp = folder / TRAINED_ON
    if (stamp.exists() and json.loads(stamp.read_text()) == trained_on
            and (folder / contract.TOKENIZER_FILE).exists()
            and (folder / contract.TOKEN_BYTES_FILE).exists()):
        print(f"tokenizer is up to date with this data, keeping it: {folder}")
    else:
        stamp.unlink(missing_ok=True)
        _train_tokenizer_on(train_paths, trained_on["vocab_size"])
        stamp.write_text(json.dumps(trained_on, indent=2) + "\n")


def prepared_already(source: str, hashes: dict, trained_on: dict):
    """The cache's manifest when the cache already holds exactly this preparation (the same source,
    files of these sha256 in this order, a tokenizer trained on them as `trained_on` says, each file
    on disk as the manifest records it); None when anything would change."""
    try:
        manifest = load_manifest()
    except HarnessError:
        return None
    folder = tokenizer.tokenizer_dir()
    stamp = folder / TRAINED_ON
    files = [*manifest.get("train_files", []), *manifest.get("val_files", [])]
    recorded = [(settings.CACHE_DIR / f["path"], f["sha256"]) for f in files]
    on_disk = [*recorded, (folder / contract.TOKENIZER_FILE, manifest.get("tokenizer_sha256")),
               (folder / contract.TOKEN_BYTES_FILE, manifest.get("token_bytes_sha256"))]
    if (manifest.get("source") != source or recorded != list(hashes.items())
            or not stamp.exists() or json.loads(stamp.read_text()) != trained_on
            or not all(p.is_file() and contract.sha256_file(p) == sha for p, sha in on_disk)):
        return None
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

    tokenizer.train_tokenizer(tokenizer_texts(), vocab_size)
    print(f"tokenizer trained in {time.time() - t0:.1f}s -> {tokenizer.tokenizer_dir()}")

