"""
The BPE tokenizer: trained by prepare.py with rustbpe, used at run time through tiktoken, with each
token's UTF-8 length beside it (bits per byte counts a token's true bytes).
"""

import io
import pickle
from pathlib import Path

import numpy as np

from harness import contract
from harness.contract import HarnessError
from harness.settings import VOCAB_SIZE

SPECIAL_TOKENS = ["<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
BOS_TOKEN = SPECIAL_TOKENS[0]
# GPT-4 style split, but numbers in chunks of 1-2 digits (a small vocabulary should not spend merges
# on 3-digit numbers)
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}"""
                 r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
ROUND_TRIP_SAMPLE = "Round-trip check: 12345 héllo\n\tworld 🙂"


def tokenizer_dir() -> Path:
    """The tokenizer's folder in the prepare cache."""
    return contract.cache_path(contract.TOKENIZER_DIR)


def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE, folder: Path = None) -> Path:
    """Train BPE on an iterable of strings; save tokenizer.pkl and token_bytes.npy in `folder`."""
    import rustbpe
    import tiktoken
    folder = Path(folder or tokenizer_dir())
    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:
        raise HarnessError(f"vocab size {vocab_size} is too small: need at least "
                           f"{256 + len(SPECIAL_TOKENS)}")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), n_merged, pattern=SPLIT_PATTERN)
    if bpe.vocab_size < n_merged:
        raise HarnessError(f"too little text for a {vocab_size}-token vocabulary: it supports only "
                           f"{bpe.vocab_size + len(SPECIAL_TOKENS)} tokens; add text or pass a "
                           f"smaller --vocab-size")
    ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
    specials = {tok: n_merged + i for i, tok in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="autoresearch", pat_str=bpe.get_pattern(),
                            mergeable_ranks=ranks, special_tokens=specials)
    if enc.decode(enc.encode_ordinary(ROUND_TRIP_SAMPLE)) != ROUND_TRIP_SAMPLE:
        raise HarnessError("trained tokenizer does not round-trip text; "
                           "this is a bug in prepare.py")
    # bits per byte needs each token's UTF-8 length; special tokens count 0 and are excluded
    token_bytes = np.zeros(n_merged + len(SPECIAL_TOKENS), dtype=np.int32)
    for b, r in ranks.items():
        token_bytes[r] = len(b)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"pattern": enc._pat_str, "mergeable_ranks": ranks, "special_tokens": specials}
    contract.atomic_write(folder / contract.TOKENIZER_FILE, pickle.dumps(state), mode="wb")
    table = io.BytesIO()
    np.save(table, token_bytes)
    contract.atomic_write(folder / contract.TOKEN_BYTES_FILE, table.getvalue(), mode="wb")
    return folder / contract.TOKENIZER_FILE


class Tokenizer:
    """Thin wrapper around a tiktoken Encoding trained by prepare.py."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, folder=None):
        import tiktoken
        path = Path(folder or tokenizer_dir()) / contract.TOKENIZER_FILE
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
        """A string -> a list of ids, a list of strings -> a list of lists; special tokens as
        text."""
        head = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text)
        return [head + ids for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids) -> str:
        return self.enc.decode(ids)


def get_token_bytes(device="cpu", folder=None):
    """Each token's UTF-8 length, as an int64 tensor on `device`."""
    import torch
    path = Path(folder or tokenizer_dir()) / contract.TOKEN_BYTES_FILE
    if not path.exists():
        raise HarnessError(f"no {path}: run `uv run prepare.py` first")
    return torch.from_numpy(np.load(path).astype(np.int64)).to(device)
