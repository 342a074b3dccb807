#!/usr/bin/env python
"""Train a small byte-level BPE tokenizer (HF `tokenizers`) on local text, for demos and tests.

Real runs use the SmolLM2 tokenizer (`HuggingFaceTB/SmolLM2-135M` or a tokenizer.json path). This tool exists so
that the quickstart works on a machine with no network and nothing but Python: it trains, in seconds, a tokenizer
with the same structure (byte-level BPE, `<|endoftext|>` as id 0, no normaliser) on the quickstart corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nanotronix.errors import fail


def iter_texts(paths: list[Path], text_key: str):
    for path in paths:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)[text_key]
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    parser.add_argument("--output", required=True, help="tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--text-key", default="text", help="JSON key of the text in .jsonl inputs")
    args = parser.parse_args(argv)

    paths = [Path(p) for p in args.input]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return fail(f"input not found: {missing[0]}")
    if args.vocab_size < 300:
        return fail("--vocab-size must be at least 300 (256 bytes + specials + merges)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(iter_texts(paths, args.text_key), trainer=trainer)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out)
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
