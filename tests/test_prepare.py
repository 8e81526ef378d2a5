"""
prepare.py as a user runs it (the CLI in a subprocess, each test with a cache of its own) and its
corpus functions in-process (with the `isolated_cache` fixture).

Every CLI run that trains a tokenizer uses a tiny vocabulary so it takes a second, not minutes.
"""

import json
import os
import random
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness import contract, data as harness_data, tokenizer as harness_tokenizer
import synthetic
from conftest import ROOT, run_script

SMALL_VOCAB = 300
MEGABYTE = 1 << 20


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sha", "vo", "pe", "dri", "nu", "gel", "om", "ix", "ba",
              "zor", "fi", "que", "ath", "wen", "ul", "syr", "pa", "grim", "oe"]


def make_vocabulary(seed: int, n: int = 400) -> list:
    rng = random.Random(seed)
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def make_docs(seed: int, n: int, words_per_doc=(30, 120), vocabulary=None) -> list:
    """n distinct documents of made-up words: varied enough to train a small BPE vocabulary."""
    rng = random.Random(seed)
    vocabulary = vocabulary or make_vocabulary(seed)
    docs = []
    for k in range(n):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(*words_per_doc))]
        docs.append(f"Doc {seed}-{k}: " + " ".join(words).capitalize() + ".")
    return docs


def make_paragraphs(seed: int, n: int) -> list:
    """n paragraphs of about 400-900 characters each."""
    return make_docs(seed, n, words_per_doc=(60, 130))


def random_bytes(n: int, seed: int = 0, nul=True) -> bytes:
    """n random bytes (a binary file named .txt); without NUL bytes when nul=False."""
    data = random.Random(seed).randbytes(n)
    return data if nul else data.replace(b"\0", b"\1")


def cache_contents(cache) -> dict:
    """Every file under the cache, by relative path, with its sha256: what a refused prepare must not change."""
    return {str(p.relative_to(cache)): contract.sha256_file(p) for p in sorted(cache.rglob("*")) if p.is_file()}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                    encoding="utf-8")


def write_parquet(path, texts, **columns):
    pq.write_table(pa.table({"text": texts, **columns}), path, row_group_size=16)


def run_prepare(tmp_path, *args, env_extra=None):
    cache = tmp_path / "cache"
    proc = run_script(["prepare.py", *args], cwd=ROOT,
                      env_extra={"AUTORESEARCH_CACHE": str(cache), **(env_extra or {})}, timeout=300)
    return proc, cache


def stderr_lines(proc) -> list:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_one_line_error(proc, *needles):
    """Exit 1, exactly one non-empty stderr line `error: ...` containing every needle, no traceback."""
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def manifest_of(cache) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def assert_manifest_files_consistent(manifest, cache):
    """Every listed file exists with the recorded size, sha256 and row count, and holds tokens."""
    for entry in manifest["train_files"] + manifest["val_files"]:
        path = cache / entry["path"]
        assert path.is_file(), entry["path"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == contract.sha256_file(path)
        assert entry["rows"] == pq.ParquetFile(path).metadata.num_rows > 0
        assert entry["tokens"] > entry["rows"]  # at least a BOS plus one token per document
    assert manifest["train_tokens"] == sum(f["tokens"] for f in manifest["train_files"]) > 0
    assert manifest["val_tokens"] == sum(f["tokens"] for f in manifest["val_files"]) > 0
    assert (cache / "tokenizer" / "tokenizer.pkl").is_file()
    assert (cache / "tokenizer" / "token_bytes.npy").is_file()


def data_line(stdout) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("data: ")]
    assert len(lines) == 1, stdout
    return lines[0]


@pytest.fixture
def mixed_corpus(tmp_path):
    """A directory of .txt, .jsonl and .parquet files (and a file that must be ignored).

    Returns (directory, expected documents in prepare's order: sorted file paths)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    paragraphs = make_paragraphs(1, 60)  # ~40 kB: cut into several documents
    long_txt = "\n\n".join(paragraphs)
    assert len(long_txt) > 3 * harness_data.TXT_DOC_CHARS
    (root / "a_long.txt").write_text(long_txt + "\n", encoding="utf-8")
    jsonl_docs = make_docs(2, 40)
    records = [{"text": d, "id": i} for i, d in enumerate(jsonl_docs)]
    records.insert(5, {"id": "no-text", "title": "a record without text is skipped"})
    records.insert(9, {"text": "   "})  # whitespace only: skipped too
    records.insert(12, "")  # blank line
    write_jsonl(root / "b_records.jsonl", records)
    parquet_docs = make_docs(3, 40)
    write_parquet(root / "sub" / "c_table.parquet", parquet_docs, n=list(range(40)))
    (root / "README.md").write_text("not part of the corpus: unsupported suffix\n")
    expected = harness_data._txt_documents(long_txt) + jsonl_docs + parquet_docs
    return root, expected


# ---------------------------------------------------------------------------
# --data: the user's own corpus
# ---------------------------------------------------------------------------

def test_cli_data_mixed_directory(tmp_path, mixed_corpus):
    root, expected = mixed_corpus
    proc, cache = run_prepare(tmp_path, "--data", str(root), "--vocab-size", str(SMALL_VOCAB))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    manifest = manifest_of(cache)
    assert manifest["source"] == "custom"
    assert manifest["smoke_test"] is False
    assert manifest["vocab_size"] == SMALL_VOCAB
    assert f"({len(expected)} documents)" in manifest["description"]
    assert str(root.resolve()) in manifest["description"]
    assert len(manifest["train_files"]) >= 1 and len(manifest["val_files"]) == 1
    assert all(f["path"].startswith("data/custom/") for f in manifest["train_files"] + manifest["val_files"])
    assert_manifest_files_consistent(manifest, cache)

    # every document landed in exactly one split, and the split is split_documents'
    train = [t for f in manifest["train_files"] for t in pq.read_table(cache / f["path"])["text"].to_pylist()]
    val = [t for f in manifest["val_files"] for t in pq.read_table(cache / f["path"])["text"].to_pylist()]
    assert (train, val) == harness_data.split_documents(expected)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(expected)

    line = data_line(proc.stdout)
    assert line.startswith("data: custom: ") and "SMOKE-TEST" not in line
    assert "no network" not in proc.stdout


def test_read_user_documents_mixed_directory(mixed_corpus):
    root, expected = mixed_corpus
    docs = harness_data.read_user_documents(root)
    assert docs == expected
    txt_docs = harness_data._txt_documents((root / "a_long.txt").read_text())
    assert len(txt_docs) >= 4  # the long .txt was cut into several documents
    assert not any("record without text" in d for d in docs)
    assert "not part of the corpus" not in "".join(docs)  # README.md ignored


def test_read_user_documents_single_file(tmp_path):
    path = tmp_path / "one.jsonl"
    write_jsonl(path, [{"text": "first"}, {"other": 1}, ["a", "list"], {"text": 7}, {"text": "second"}])
    assert harness_data.read_user_documents(path) == ["first", "second"]


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """A UTF-8 BOM is dropped, CRLF line ends are fine, and U+2028 inside a JSON string is not a line end."""
    path = tmp_path / "records.jsonl"
    texts = ["a line separator\u2028inside a record", "a record after a CRLF", "é and ü"]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps({"text": t}, ensure_ascii=False)
                                                for t in texts).encode("utf-8"))
    assert harness_data.read_user_documents(path) == texts


def test_long_txt_split_at_paragraph_breaks():
    paragraphs = make_paragraphs(4, 50)
    text = "\n\n".join(paragraphs)
    docs = harness_data._txt_documents("\n" + text + "\n\n")
    assert len(docs) >= 3
    # cut only between paragraphs: rejoining gives the text back, paragraph for paragraph
    assert "\n\n".join(docs) == text
    assert all(d.split("\n\n")[0] in paragraphs and d.split("\n\n")[-1] in paragraphs for d in docs)
    longest_paragraph = max(map(len, paragraphs))
    assert all(len(d) <= harness_data.TXT_DOC_CHARS + longest_paragraph for d in docs)
    assert all(len(d) > harness_data.TXT_DOC_CHARS // 2 for d in docs[:-1])  # not cut into tiny pieces
    # a short file is one document; an empty one none
    assert harness_data._txt_documents("  short text \n") == ["short text"]
    assert harness_data._txt_documents(" \n\n ") == []


def test_split_documents_deterministic_and_disjoint():
    docs = make_docs(5, 500)
    train, val = harness_data.split_documents(docs)
    assert harness_data.split_documents(list(docs)) == (train, val)
    assert len(val) == round(harness_data.VAL_FRACTION * len(docs))
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    # train and val keep the corpus order
    assert train == [d for d in docs if d in set(train)]

    # val membership depends on content, not on the order the files were read in
    for seed in range(3):
        shuffled = list(docs)
        random.Random(seed).shuffle(shuffled)
        train2, val2 = harness_data.split_documents(shuffled)
        assert set(val2) == set(val) and set(train2) == set(train)


def test_split_documents_small_corpora():
    train, val = harness_data.split_documents(["one document", "another document"])
    assert len(train) == len(val) == 1 and {*train, *val} == {"one document", "another document"}
    with pytest.raises(contract.HarnessError, match="at least 2 documents"):
        harness_data.split_documents(["alone"])


def test_prepare_custom_in_process(isolated_cache, mixed_corpus):
    root, expected = mixed_corpus
    manifest = harness_data.prepare("custom", data_path=root, vocab_size=SMALL_VOCAB)
    assert manifest == harness_data.load_manifest()
    assert manifest["source"] == "custom" and manifest["smoke_test"] is False
    assert_manifest_files_consistent(manifest, isolated_cache)
    tokenizer = harness_tokenizer.Tokenizer.from_directory()
    assert tokenizer.get_vocab_size() == SMALL_VOCAB
    sample = expected[0][:500]
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    # preparing the same corpus again gives the same content hash, and keeps the trained tokenizer
    tokenizer_mtime = (isolated_cache / "tokenizer" / "tokenizer.pkl").stat().st_mtime_ns
    again = harness_data.prepare("custom", data_path=root, vocab_size=SMALL_VOCAB)
    assert again["manifest_hash"] == manifest["manifest_hash"]
    assert (isolated_cache / "tokenizer" / "tokenizer.pkl").stat().st_mtime_ns == tokenizer_mtime
    # another vocabulary is a new tokenizer
    bigger = harness_data.prepare("custom", data_path=root, vocab_size=SMALL_VOCAB + 20)
    assert harness_tokenizer.Tokenizer.from_directory().get_vocab_size() == SMALL_VOCAB + 20
    assert bigger["tokenizer_sha256"] != manifest["tokenizer_sha256"]


def test_a_prepare_that_fails_half_way_leaves_no_stale_manifest(isolated_cache, tmp_path):
    """Too little text shows only when the tokenizer trains, after the new corpus was written."""
    good = tmp_path / "good"
    good.mkdir()
    write_jsonl(good / "a.jsonl", [{"text": d} for d in make_docs(6, 60)])
    harness_data.prepare("custom", data_path=good, vocab_size=SMALL_VOCAB)

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    write_jsonl(tiny / "a.jsonl", [{"text": "a few words"}, {"text": "and a few more"}, {"text": "done"}])
    with pytest.raises(contract.HarnessError, match="too little text"):
        harness_data.prepare("custom", data_path=tiny)  # default vocabulary: far too big for this corpus

    # no manifest describing files it did not build: train.py then says "run prepare.py first"
    assert not contract.cache_path(contract.MANIFEST).exists()
    with pytest.raises(contract.HarnessError, match="uv run prepare.py"):
        harness_data.load_manifest()


def _refused_inputs(tmp_path) -> dict:
    """--data inputs that must be refused: name -> path (each built under tmp_path/refused)."""
    base = tmp_path / "refused"
    base.mkdir()
    empty_dir = base / "empty_dir"
    empty_dir.mkdir()
    images = base / "images"
    images.mkdir()
    _images_only(images)
    (base / "empty.txt").write_bytes(b"")
    (base / "noise.txt").write_bytes(random_bytes(MEGABYTE))
    (base / "latin1.txt").write_bytes("Olé, ça va très bien.\n".encode("latin-1"))
    write_jsonl(base / "no_text.jsonl", [{"title": "no text field"}, {"text": " "}])
    return {"missing path": base / "no" / "such" / "corpus", "empty directory": empty_dir,
            "images only": images, "empty file": base / "empty.txt", "random bytes": base / "noise.txt",
            "latin-1 text": base / "latin1.txt", "no text": base / "no_text.jsonl"}


def test_a_refused_data_leaves_the_previous_preparation_intact(isolated_cache, tmp_path):
    from analysis import integrity
    manifest = harness_data.prepare("offline", vocab_size=SMALL_VOCAB)
    before = cache_contents(isolated_cache)
    assert "manifest.json" in before and any(p.startswith("data/offline/") for p in before)

    for name, path in _refused_inputs(tmp_path).items():
        with pytest.raises(contract.HarnessError, match=r"^--data "):
            harness_data.prepare("custom", data_path=path, vocab_size=SMALL_VOCAB)
        assert cache_contents(isolated_cache) == before, f"{name}: the refused call changed the cache"
        assert harness_data.load_manifest() == manifest, name
        # the data still verifies, as analyze.py checks it before trusting a run's number
        assert integrity.data_problems({"data": {"manifest_hash": manifest["manifest_hash"]}},
                                       isolated_cache, None) == [], name
    assert_manifest_files_consistent(manifest, isolated_cache)


def test_cli_a_refused_data_leaves_the_previous_preparation_intact(tmp_path):
    proc, cache = run_prepare(tmp_path, "--offline", "--vocab-size", str(SMALL_VOCAB))
    assert proc.returncode == 0, proc.stderr
    before = cache_contents(cache)
    noise = tmp_path / "noise.txt"
    noise.write_bytes(random_bytes(MEGABYTE))

    proc, _ = run_prepare(tmp_path, "--data", str(noise), "--vocab-size", str(SMALL_VOCAB))
    assert_one_line_error(proc, f"{noise}: binary, not text")
    assert cache_contents(cache) == before
    assert_manifest_files_consistent(manifest_of(cache), cache)


def test_cli_data_says_what_it_read_and_skipped(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    docs = make_docs(8, 80)
    write_jsonl(root / "good.jsonl", [{"text": d} for d in docs])
    (root / "noise.txt").write_bytes(random_bytes(MEGABYTE))
    (root / "noise_without_nul.txt").write_bytes(random_bytes(MEGABYTE, seed=1, nul=False))
    (root / "latin1.txt").write_bytes("Crème brûlée et café.\n".encode("latin-1"))
    (root / "blank.txt").write_text("\n  \n")
    (root / "photo.png").write_bytes(random_bytes(4096, seed=2))

    proc, cache = run_prepare(tmp_path, "--data", str(root), "--vocab-size", str(SMALL_VOCAB))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    size = (root / "good.jsonl").stat().st_size
    assert f"--data {root}: read {len(docs)} documents from 1 file(s), {size:,} bytes; skipped 4 file(s)" in lines
    assert f"  skipped {root / 'blank.txt'}: {harness_data.NO_TEXT}" in lines
    assert f"  skipped {root / 'latin1.txt'}: not UTF-8 text (byte 0xe8 at offset 2); if it is text in another " \
           f"encoding, convert it, e.g. `iconv -f latin1 -t utf-8`" in lines
    assert f"  skipped {root / 'noise.txt'}: binary, not text (it contains NUL bytes)" in lines
    assert any(line.startswith(f"  skipped {root / 'noise_without_nul.txt'}: not UTF-8 text (byte 0x")
               for line in lines), proc.stdout
    assert "  ignored 1 file(s) of other types (.png: 1); prepare.py reads .txt, .jsonl, .parquet" in lines

    # only the good file's documents were prepared
    manifest = manifest_of(cache)
    prepared_docs = [t for f in manifest["train_files"] + manifest["val_files"]
                     for t in pq.read_table(cache / f["path"])["text"].to_pylist()]
    assert sorted(prepared_docs) == sorted(docs)
    assert f"({len(docs)} documents)" in manifest["description"]


def test_copies_of_a_document_stay_on_one_side_of_the_split():
    docs = [f"unique document number {i}" for i in range(40)] + ["the same text"] * 10
    train, val = harness_data.split_documents(docs)
    assert ("the same text" in train) != ("the same text" in val)
    assert len(train) + len(val) == len(docs)
    with pytest.raises(contract.HarnessError, match="copy of the same text"):
        harness_data.split_documents(["same"] * 5)


# ---------------------------------------------------------------------------
# The offline smoke-test corpus: the fallback without network, and --offline
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("flag", [None, "--offline"], ids=["no-network-fallback", "offline-flag"])
def test_cli_offline_corpus(tmp_path, flag):
    # conftest points AUTORESEARCH_DATA_URL at a closed local port; run_script inherits it
    args = ["--vocab-size", str(SMALL_VOCAB)] + ([flag] if flag else [])
    proc, cache = run_prepare(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    notices = [line for line in proc.stdout.splitlines() if line.startswith("no network")]
    if flag == "--offline":
        assert notices == []  # asked for offline: no probe, no complaint
    else:
        assert len(notices) == 1, proc.stdout
        assert "smoke-test" in notices[0].lower()
        assert "127.0.0.1:9" in notices[0]
        assert "--data" in notices[0]

    manifest = manifest_of(cache)
    assert manifest["source"] == "offline"
    assert manifest["smoke_test"] is True
    assert "SMOKE-TEST" in manifest["description"]
    assert len(manifest["train_files"]) >= 1 and len(manifest["val_files"]) == 1
    assert_manifest_files_consistent(manifest, cache)
    line = data_line(proc.stdout)
    assert line.startswith("data: offline (SMOKE-TEST corpus")


# ---------------------------------------------------------------------------
# Bad input: exit 1, one `error: ...` line, no traceback, nothing prepared
# ---------------------------------------------------------------------------

def _no_files(root):
    (root / "notes.md").write_text("markdown is not a supported format\n")
    (root / "table.csv").write_text("text\nhello\n")
    return [f"--data {root}:", "no .txt, .jsonl, .parquet files"]


def _no_text(root):
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n \n\n")
    write_jsonl(root / "records.jsonl", [{"title": "no text field"}, {"text": ""}, {"text": None}, {"body": "x"}])
    return [f"--data {root}:", "no text found in 3 file(s)", "'text' field"]


def _corrupt_parquet(root):
    (root / "good.txt").write_text(" ".join(make_docs(7, 20)))
    (root / "broken.parquet").write_bytes(random.Random(0).randbytes(4096))
    return [f"corrupt parquet file {root / 'broken.parquet'}"]


def _parquet_without_text_column(root):
    pq.write_table(pa.table({"body": ["some text", "more text"]}), root / "wrong.parquet")
    return [str(root / "wrong.parquet"), "no 'text' column", "body"]


def _bad_jsonl_line(root):
    (root / "data.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "oops",\n{"text": "x"}\n')
    return [f"{root / 'data.jsonl'}:3:", "not valid JSON"]


def _too_little_text(root):
    write_jsonl(root / "tiny.jsonl", [{"text": "a few words"}, {"text": "and a few more words"},
                                      {"text": "that is all there is"}])
    return ["too little text", "8192-token vocabulary", "--vocab-size"]


def _jsonl_not_utf8(root):
    (root / "latin1.jsonl").write_bytes('{"text": "café au lait"}\n{"text": "olé"}\n'.encode("latin-1"))
    return [str(root / "latin1.jsonl")]


def _parquet_text_not_strings(root):
    pq.write_table(pa.table({"text": [1, 2, 3]}), root / "numbers.parquet")
    return [str(root / "numbers.parquet")]


def _empty_directory(root):
    return [f"--data {root}:", "no .txt, .jsonl, .parquet files", "it is empty"]


def _images_only(root):
    for name in ("cat.png", "dog.png", "scan.jpg"):
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(name).randbytes(2048))
    return ["no .txt, .jsonl, .parquet files", "3 other file(s): .jpg: 1, .png: 2"]


def _random_bytes_txt(root):
    (root / "noise.txt").write_bytes(random_bytes(MEGABYTE))
    return [f"{root / 'noise.txt'}: binary, not text", "no text found in 1 file(s)"]


def _latin1_txt(root):
    (root / "latin1.txt").write_bytes("Un café au lait, s'il vous plaît.\n".encode("latin-1"))
    return [f"{root / 'latin1.txt'}: not UTF-8 text (byte 0xe9 at offset 6)", "iconv"]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (the read-only "
                    "mount of the cache); .ci/run installs it")
def test_a_prepared_cache_is_only_read_by_prepare_again(tmp_path):
    """program.md's setup runs `uv run prepare.py` on a prepared cache; on a read-only one (a shared
    cluster cache, the agent's box) it must change nothing and say so, not crash."""
    proc, cache = run_prepare(tmp_path, "--offline", "--vocab-size", str(SMALL_VOCAB))
    assert proc.returncode == 0, proc.stderr
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    again = subprocess.run(["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--cap-drop",
                            "ALL", "--chdir", str(ROOT), sys.executable, "prepare.py", "--offline",
                            "--vocab-size", str(SMALL_VOCAB)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "AUTORESEARCH_CACHE": str(cache)})
    assert again.returncode == 0, again.stderr
    assert f"already prepared in {cache} (offline (SMOKE-TEST corpus, not for research)): nothing to change" \
        in again.stdout
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("build", [
    _no_files, _no_text, _corrupt_parquet, _parquet_without_text_column, _bad_jsonl_line, _too_little_text,
    _jsonl_not_utf8, _parquet_text_not_strings, _empty_directory, _images_only, _random_bytes_txt, _latin1_txt,
], ids=lambda f: f.__name__.strip("_"))
def test_cli_bad_data_directory(tmp_path, build):
    root = tmp_path / "corpus"
    root.mkdir()
    needles = build(root)
    proc, cache = run_prepare(tmp_path, "--data", str(root))
    assert_one_line_error(proc, *needles)
    assert not (cache / "manifest.json").exists()


def test_cli_data_path_missing(tmp_path):
    missing = tmp_path / "no" / "such" / "corpus"
    proc, cache = run_prepare(tmp_path, "--data", str(missing))
    assert_one_line_error(proc, str(missing), "no such file or directory")
    assert not (cache / "manifest.json").exists()


def test_cli_data_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    proc, cache = run_prepare(tmp_path, "--data", str(path))
    assert_one_line_error(proc, f"--data {path}: no text found in 1 file(s)", f"{path}: no text")
    assert not (cache / "manifest.json").exists()


def test_cli_data_unsupported_file(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n")
    proc, cache = run_prepare(tmp_path, "--data", str(path))
    assert_one_line_error(proc, "unsupported file type '.csv'", ".txt, .jsonl, .parquet")
    assert not (cache / "manifest.json").exists()


# ---------------------------------------------------------------------------
# train.py before prepare.py
# ---------------------------------------------------------------------------

def test_train_before_prepare(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    synthetic.copy_harness(repo, ("train.py", "prepare.py"))
    stale = {"status": "ok", "val_bpb": 0.123, "note": "stale summary of an earlier run"}
    (repo / "run_summary.json").write_text(json.dumps(stale))
    empty_cache = tmp_path / "empty-cache"
    empty_cache.mkdir()

    proc = run_script(["train.py"], cwd=repo, env_extra={"AUTORESEARCH_CACHE": str(empty_cache)}, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "run `uv run prepare.py` first" in output
    assert "Traceback" not in proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr

    # the stale summary is gone: the logger replaced it with a crash summary of this run
    summary = json.loads((repo / "run_summary.json").read_text())
    assert "note" not in summary and summary["status"] == "crash"
    assert "run `uv run prepare.py` first" in summary["error"]
    assert contract.summary_problems(summary) == []
