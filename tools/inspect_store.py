#!/usr/bin/env python
"""Summarise a token store (Megatron .bin/.idx, datatrove .ds, zarr), print a document, or verify it.

    python tools/inspect_store.py PREFIX [--doc N] [--json] [--verify]

--verify reads the whole store and checks every invariant of its format (header, sizes, contiguous
pointers, token ids inside the vocabulary, EOS at the end of every document, sidecar counts); it exits
non-zero with one line naming the first damage.
"""
import argparse
import json
import sys

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)
from nanotronix.cli import ArgumentParser, integer, one_line_errors, user_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=user_path, metavar="PREFIX",
                        help="store prefix, .ds file, zarr folder or fsspec URL")
    parser.add_argument("--doc", type=integer, metavar="N", help="print the token ids of document N")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--verify", action="store_true", help="check every invariant; non-zero exit on damage")
    return parser.parse_args(argv)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from nanotronix.data import open_store
    store = open_store(args.store)
    report = store.summary()
    if args.verify:  # first: a damaged index is then named as such, not met while reading --doc
        store.verify(progress=not args.json)
        report["verified"] = True
    if args.doc is not None:
        report["doc"] = args.doc
        report["doc_tokens"] = store.document(args.doc).tolist()
    if args.json:
        print(json.dumps(report))
        return 0
    for key in ("path", "format", "dtype", "documents", "tokens", "tokenizer", "tokenizer_sha256", "vocab_size",
                "eos_id", "skipped_records"):
        print(f"{key:17s} {report[key] if report[key] is not None else '-'}")
    if report["multimodal"]:  # megatron-core's multimodal=True: its sequence modes are not read
        print(f"{'multimodal':17s} yes (a mode per sequence; nanotronix trains every sequence as text tokens)")
    if "parts" in report:  # a folder read as one store: preprocess shards, datatrove .ds files
        print(f"{'parts':17s} {report['parts']}")
    if args.doc is not None:
        print(f"document {args.doc} ({len(report['doc_tokens'])} tokens): {' '.join(map(str, report['doc_tokens']))}")
    if args.verify:
        print("verify           OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
