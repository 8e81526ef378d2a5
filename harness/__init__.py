"""
The fixed harness: settings, the contract, data, tokenizer, loader, metric, device, run logging,
self-check, the fixed files checked by content, git, processes and Slurm. The agent never edits
it; every file is hashed into each run's harness_hash.
"""
