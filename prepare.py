"""
Prepare the data and the tokenizer once, and the names train.py imports (the fixed harness: the
agent never edits this file; the harness itself is the harness/ package).

    uv run prepare.py                    # 10 climbmix train shards + the pinned val shard
    uv run prepare.py --num-shards 4     # fewer shards
    uv run prepare.py --data PATH        # your own .txt / .jsonl / .parquet corpus
    uv run prepare.py --offline          # the built-in smoke-test corpus (no network)
    uv run prepare.py --vocab-size 4096  # another BPE vocabulary

Everything lands in ~/.cache/autoresearch (or $AUTORESEARCH_CACHE).
"""

import argparse
import sys

from harness import contract, data, selfcheck, settings
from harness.contract import HarnessError
from harness.loader import make_dataloader
from harness.runlog import start_run
from harness.settings import MAX_SEQ_LEN, TIME_BUDGET
from harness.tokenizer import Tokenizer

__all__ = ["MAX_SEQ_LEN", "TIME_BUDGET", "Tokenizer", "make_dataloader", "start_run"]  # train.py's


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for "
                                                 "auto-log-research.")
    parser.add_argument("--num-shards", type=int, default=data.DEFAULT_NUM_SHARDS,
                        help=f"climbmix train shards to download "
                             f"(default {data.DEFAULT_NUM_SHARDS})")
    parser.add_argument("--data", metavar="PATH",
                        help="your own corpus: a .txt/.jsonl/.parquet file or a directory of them")
    parser.add_argument("--offline", action="store_true",
                        help="use the built-in smoke-test corpus, no network")
    parser.add_argument("--vocab-size", type=int, default=settings.VOCAB_SIZE,
                        help=f"BPE vocabulary (default {settings.VOCAB_SIZE})")
    args = parser.parse_args(argv)
    try:
        settings.CACHE_DIR.mkdir(parents=True, exist_ok=True)
        if args.data:
            source = "custom"
        elif args.offline:
            source = "offline"
        elif data.network_reachable():
            source = "climbmix"
        else:
            print(f"no network: cannot reach {settings.DATA_URL}; falling back to the offline "
                  f"SMOKE-TEST corpus (not for research; use --data PATH for your own text)")
            source = "offline"
        manifest = data.prepare(source, args.num_shards, args.data, args.vocab_size)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"data: {data.data_label(manifest)}: {manifest['description']}")
    print(f"train tokens: {manifest['train_tokens']:,}  val tokens: {manifest['val_tokens']:,}  "
          f"vocab: {manifest['vocab_size']}  manifest: {contract.cache_path(contract.MANIFEST)} "
          f"({manifest['manifest_hash']})")
    return 0


selfcheck.snapshot()  # last: the harness as imported, before train.py's own code can touch it

if __name__ == "__main__":
    sys.exit(main())
