#!/usr/bin/env python
"""Tokenize text into a token store (Megatron .bin/.idx by default, or zarr).

    python tools/preprocess.py --input FILE_OR_DIR [...] --tokenizer TOKENIZER --output-prefix PREFIX \\
        [--text-key text] [--workers N] [--format megatron|zarr] [--skip-bad] [--shard I/N] [--shuffle [SEED]]
        [--overwrite]

Inputs: .jsonl/.ndjson/.json (optionally .gz/.zst), .parquet, plain text files (.txt/.md/.rst/.py/... one file
= one document), or folders of them. Each document is followed by the tokenizer's EOS id. A bad record stops
the run with file:line and the reason unless --skip-bad is given (then reasons are counted in the sidecar).

--shard I/N (one task of N, e.g. a Slurm job array: slurm/preprocess.sh) tokenizes only the I-th of N contiguous
runs of the sorted inputs, about equal in text (compressed files weighed by their decoded size, estimated from
their first block), into PREFIX/shard-IIIII-of-NNNNN (large JSON-lines files are
cut at line starts, compressed ones at 64 KiB blocks of compressed bytes, Parquet files at row groups); once all N
are written, the folder PREFIX is one dataset whose token stream is exactly what one run over all the inputs
writes.

--shuffle stores the documents in a random order (from SEED, default 1234, and the shard index): the training
sampler shuffles windows, not documents, so this keeps documents that were neighbours in the input (same crawl,
same site) out of the same training windows. It costs a raw temporary copy of the tokens beside the output.
"""
import argparse
import os
import sys

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)
from nanotronix.cli import (ArgumentParser, EXIT_TERMINATED, Terminated, integer, non_negative_int, one_line_errors,
                            user_path)
from nanotronix.train import EXIT_INTERRUPTED


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=user_path, nargs="+", action="extend", required=True, metavar="FILE_OR_DIR",
                        help="input files or folders (repeatable)")
    parser.add_argument("--tokenizer", type=user_path, required=True,
                        help="tokenizer.json, a folder holding one, or a Hugging Face Hub id")
    parser.add_argument("--output-prefix", type=user_path, required=True,
                        help="output prefix: PREFIX.bin/.idx/.meta.json (megatron) or PREFIX.zarr (zarr)")
    parser.add_argument("--text-key", default="text", help="JSON/Parquet field holding the text (default: text)")
    parser.add_argument("--workers", type=integer, default=_usable_cores(),
                        help="tokenizing threads, up to 8 per process (default: the cores this process may use; "
                             "at most 4 per core, or 64)")
    parser.add_argument("--format", default="megatron", choices=["megatron", "zarr"], help="store format")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad records (counted by reason) instead of stopping at the first one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--shuffle", metavar="SEED", type=non_negative_int, nargs="?", const=1234, default=None,
                        help="store the documents in a random order from SEED (default 1234)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a store already at the output prefix (refused otherwise)")
    parser.add_argument("--shard", metavar="I/N", type=parse_shard,
                        help="tokenize only shard I of N (0 <= I < N) of the inputs into PREFIX/shard-IIIII-of-NNNNN")
    return parser.parse_args(argv)


def _usable_cores() -> int:
    """The cores this process may run on (a Slurm task's --cpus-per-task, taskset), not all the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (text.isascii() and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N")
    return int(index), int(count)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from nanotronix.data.pipeline import PreprocessOptions, preprocess
    from nanotronix.errors import StoppedWhenComplete
    opts = PreprocessOptions(inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix,
                             text_key=args.text_key, workers=args.workers, format=args.format,
                             skip_bad=args.skip_bad, progress=not args.no_progress, shard=args.shard,
                             shuffle_seed=args.shuffle, overwrite=args.overwrite)
    try:
        result = preprocess(opts)
    except StoppedWhenComplete as e:  # after the store's last rename: only the cleanup after it was stopped
        print(f"preprocess: {'terminated' if e.terminated else 'interrupted'} once the store was complete: "
              f"{e.output} is written whole", file=sys.stderr)
        return EXIT_TERMINATED if e.terminated else EXIT_INTERRUPTED
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated); other errors: one_line_errors
        terminated = isinstance(e, Terminated)
        print(f"preprocess: {'terminated' if terminated else 'interrupted'}; no output was written",
              file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
