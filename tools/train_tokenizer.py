#!/usr/bin/env python
"""Train a small byte-level BPE tokenizer (HF `tokenizers`) on local text, for demos and tests.

Real runs use the SmolLM2 tokenizer (`HuggingFaceTB/SmolLM2-135M` or a tokenizer.json path). This tool exists so
that the quickstart works on a machine with no network and nothing but Python: it trains, in seconds, a tokenizer
with the same structure (byte-level BPE, `<|endoftext|>` as id 0, no normaliser) on the quickstart corpus.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)
from nanotronix.cli import ArgumentParser, check_writable_folder, integer, one_line_errors, replace_file, user_path
from nanotronix.errors import fail

# far above any LM vocabulary (SmolLM2: 49,152); the trainer allocates for it up front and aborts in Rust past memory
MAX_VOCAB = 1_000_000


@one_line_errors
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=user_path, nargs="+", action="extend", required=True, metavar="FILE_OR_DIR",
                        help="what tools/preprocess.py reads: text, .jsonl[.gz|.zst] or .parquet files, or folders")
    parser.add_argument("--output", type=user_path, required=True, help="tokenizer.json to write")
    parser.add_argument("--vocab-size", type=integer, default=4096, help="tokens in the vocabulary (default: 4096)")
    parser.add_argument("--text-key", default="text", help="JSON key of the text in .jsonl inputs")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output (refused otherwise: stores tokenized with it would no "
                             "longer match it)")
    args = parser.parse_args(argv)

    if not 300 <= args.vocab_size <= MAX_VOCAB:
        return fail(f"--vocab-size must be between 300 (256 bytes + specials + merges) and {MAX_VOCAB:,}")
    out = Path(args.output)
    if out.is_dir() or args.output.endswith("/"):  # Path drops the slash: "new/" would have been a file named new
        return fail(f"--output {args.output} is a folder; name the tokenizer.json to write")
    if out.exists() and not args.overwrite:
        return fail(f"--output {out} already exists (token stores made with it would no longer match it); pass "
                    "--overwrite to replace it")
    if out.is_file():
        from nanotronix.data.inputs import expand_inputs
        if any(os.path.samefile(out, f) for f in expand_inputs(args.input)):
            return fail(f"--output {out} is one of the --input files, which --overwrite would replace")
    # keep=False: folders it makes go again at once (replace_file makes them when the tokenizer is written), so that
    # an input found bad later leaves no empty folders behind
    check_writable_folder(out.parent, "--output", keep=False)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nanotronix.data.encode import read_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())  # its bar is blank lines in a log
    texts = read_texts(args.input, args.text_key)
    first = next(texts)  # a bad or empty input is said before training starts
    tok.train_from_iterator(itertools.chain([first], texts), trainer=trainer)
    # written by Python, not tok.save: its Rust error ("No space left on device (os error 28)") is no OSError
    replace_file(out, lambda temp: Path(temp).write_text(tok.to_str(pretty=True), encoding="utf-8"))
    made = tok.get_vocab_size()
    # BPE stops when no pair is left to merge: a small corpus gives fewer tokens than asked, said rather than left
    # for the store's vocab_size to reveal
    short = f" (of --vocab-size {args.vocab_size}: the texts hold no more merges)" if made < args.vocab_size else ""
    print(f"tokenizer: {made} tokens{short} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
