#!/usr/bin/env python
"""Write a small real corpus that exists on every machine with Python: the standard library's own source.

One JSON line per module ({"text": ..., "source": path}), sorted by path so the corpus is the same on every run
of the same Python. Test suites are skipped (they are mostly data), and the corpus stops at --max-mb.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--max-mb", type=float, default=6.0, help="stop after this many MB of text")
    args = parser.parse_args(argv)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not {"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(p.relative_to(stdlib).parts))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    total, docs = 0, 0
    with tmp.open("w", encoding="utf-8") as f:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue
            f.write(json.dumps({"text": text, "source": str(path.relative_to(stdlib))}) + "\n")
            total += len(text.encode())
            docs += 1
            if total >= args.max_mb * 1e6:
                break
    os.replace(tmp, out)
    print(f"corpus: {docs} modules of the Python {sys.version.split()[0]} standard library, "
          f"{total / 1e6:.1f} MB -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
