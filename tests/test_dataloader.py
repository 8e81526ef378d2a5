"""The BOS-aligned best-fit packing dataloader: shapes, alignment, no padding, split isolation, seeding."""

import pyarrow.parquet as pq
import pytest
import torch

from harness import contract, data as harness_data, loader as harness_loader, metric

B, T = 4, 96


def test_shapes_dtype_and_shift(prepared, tokenizer):
    loader = harness_loader.make_dataloader(tokenizer, B, T, "train")
    for _ in range(3):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (B, T)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        assert x.is_contiguous() and y.is_contiguous()  # not strided views of one (B, T + 1) batch
        assert epoch >= 1
        assert int(x.max()) < tokenizer.get_vocab_size() and int(x.min()) >= 0


def test_every_row_starts_with_bos(prepared, tokenizer):
    loader = harness_loader.make_dataloader(tokenizer, 8, T, "train")
    for _ in range(5):
        x, _, _ = next(loader)
        assert (x[:, 0] == tokenizer.get_bos_token_id()).all()


def test_rows_are_whole_documents_then_one_cropped_document(prepared, tokenizer):
    """No padding: each row is a run of complete documents, and only its last document may be cut short."""
    bos = tokenizer.get_bos_token_id()
    docs = [t for path in harness_loader.split_files("val") for t in harness_data._iter_parquet_texts(path)]
    documents = {tuple(ids) for ids in tokenizer.encode(docs, prepend=bos)}
    rows = harness_loader.packed_rows(tokenizer, 512, "val", buffer_size=64)
    whole = 0
    for _ in range(20):
        row, _ = next(rows)
        assert len(row) == 512
        starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
        assert starts[0] == 0
        segments = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
        for seg in segments[:-1]:
            assert seg in documents
            whole += 1
        last = segments[-1]
        assert any(d[:len(last)] == last for d in documents)
    assert whole > 0  # the packing really packs several documents per row


def test_best_fit_prefers_the_largest_document_that_fits(monkeypatch, tokenizer):
    bos = tokenizer.get_bos_token_id()
    lengths = [5, 9, 3, 7, 2]
    texts = ["x" * n for n in lengths]  # placeholder texts, encoded by the fake below

    class FakeTok:
        def get_bos_token_id(self):
            return bos

        def encode(self, batch, prepend=None):
            return [[prepend] + [1] * (len(t) - 1) for t in batch]

    monkeypatch.setattr(harness_loader, "_document_batches", lambda split, seed: iter([(texts, 1)] + [(["y" * 50], 2)] * 100))
    rows = harness_loader.packed_rows(FakeTok(), 12, "train", buffer_size=5)
    row, _ = next(rows)
    starts = [i for i, t in enumerate(row) if t == bos]
    # space 12: take 9 (largest that fits), then space 3: take 3
    assert starts == [0, 9]


def test_train_never_reads_the_val_split(prepared, tokenizer, monkeypatch):
    opened = []
    real = pq.ParquetFile

    def recording(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(harness_data.pq, "ParquetFile", recording)
    loader = harness_loader.make_dataloader(tokenizer, B, T, "train")
    for _ in range(10):
        next(loader)
    val_paths = {str(p) for p in harness_loader.split_files("val")}
    train_paths = {str(p) for p in harness_loader.split_files("train")}
    assert opened and set(opened) <= train_paths
    assert not val_paths & set(opened)


def test_seed_sets_data_order(prepared, tokenizer, monkeypatch):
    # small row groups so the shuffle has units to permute
    def first_batches(seed, n=3):
        loader = harness_loader.make_dataloader(tokenizer, B, T, "train", seed=seed, buffer_size=8)
        return [next(loader)[0] for _ in range(n)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_val_rows_do_not_depend_on_seed_or_batch(prepared, tokenizer):
    rows = metric.val_rows(tokenizer, 3, T=128)
    again = harness_loader.packed_rows(tokenizer, 129, "val", seed=123)
    for r in rows:
        assert torch.equal(r, torch.from_numpy(next(again)[0]))


def test_unknown_split_is_refused(prepared):
    with pytest.raises(ValueError, match="split"):
        harness_loader.split_files("test")


def test_a_batch_is_not_overwritten_by_the_next(prepared, tokenizer):
    """The loader fills one buffer; what it hands out must survive the next batch."""
    loader = harness_loader.make_dataloader(tokenizer, B, T, "train")
    x, y, _ = next(loader)
    kept = x.clone(), y.clone()
    x2, _, _ = next(loader)
    assert torch.equal(x, kept[0]) and torch.equal(y, kept[1])
    assert not torch.equal(x, x2)


def test_the_dataloader_never_serves_the_validation_rows(prepared, tokenizer):
    with pytest.raises(contract.HarnessError, match="serves the train split only"):
        next(harness_loader.make_dataloader(tokenizer, B, T, "val"))
