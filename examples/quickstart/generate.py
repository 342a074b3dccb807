#!/usr/bin/env python
"""Load an exported model with Hugging Face `transformers` and continue a prompt (greedy), to show the export works."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="folder written by tools/convert_to_hf.py")
    parser.add_argument("--prompt", default="def __init__(self")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():  # transformers' own error is a traceback about the Hub
        print(f"error: {args.model}: no exported model here (no config.json): write one with tools/convert_to_hf.py",
              file=sys.stderr)
        return 2

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    print(f"transformers {type(model).__name__} continues {args.prompt!r}:")
    print(tokenizer.decode(out[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
