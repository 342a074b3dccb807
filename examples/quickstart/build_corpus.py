#!/usr/bin/env python
"""Write a small real corpus that exists on every machine with Python: the standard library's own source.

One JSON line per module ({"text": ..., "source": path}), sorted by path so the corpus is the same on every run
of the same Python. Test suites are skipped (they are mostly data), and the corpus stops at --max-mb. With
--heldout, the modules that follow (up to --heldout-mb) go to a second file: text the model never trains on, for
the validation loss.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path


def write_jsonl(out: Path, modules, stdlib: Path, max_mb: float) -> tuple[int, int]:
    """Write modules from the iterator until max_mb of text; returns (modules, bytes). Appears only when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    total, docs = 0, 0
    with tmp.open("w", encoding="utf-8") as f:
        for path, text in modules:
            f.write(json.dumps({"text": text, "source": str(path.relative_to(stdlib))}) + "\n")
            total += len(text.encode())
            docs += 1
            if total >= max_mb * 1e6:
                break
    os.replace(tmp, out)
    return docs, total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--max-mb", type=float, default=6.0, help="stop after this many MB of text")
    parser.add_argument("--heldout", help="JSONL file for the held-out modules that follow the corpus")
    parser.add_argument("--heldout-mb", type=float, default=0.3, help="MB of held-out text (default 0.3)")
    args = parser.parse_args(argv)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not {"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(p.relative_to(stdlib).parts))
    modules = ((path, path.read_text(encoding="utf-8", errors="replace")) for path in files)
    modules = ((path, text) for path, text in modules if text.strip())
    docs, total = write_jsonl(Path(args.output), modules, stdlib, args.max_mb)
    print(f"corpus: {docs} modules of the Python {sys.version.split()[0]} standard library, "
          f"{total / 1e6:.1f} MB -> {args.output}")
    if args.heldout:
        docs, total = write_jsonl(Path(args.heldout), modules, stdlib, args.heldout_mb)  # the modules that follow
        print(f"held out: the next {docs} modules, {total / 1e6:.1f} MB -> {args.heldout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
