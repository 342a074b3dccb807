#!/usr/bin/env python
"""Import a Hugging Face Llama folder (SmolLM2 included) as a nanotronix checkpoint to continue training from.

    python tools/convert_from_hf.py --hf HF_DIR --output CKPT_DIR [--overwrite] [--no-progress]

CKPT_DIR becomes a run checkpoint folder (step_0000000/ + latest) holding fp32 weights and no optimizer state.
Train from it with `checkpoint.resume=CKPT_DIR` (e.g. the 8k context stage: `model.rope_theta=130000`).
"""
from __future__ import annotations

import argparse
import sys

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)
from nanotronix.cli import ArgumentParser, one_line_errors, user_path
from nanotronix.errors import fail


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="tools/convert_from_hf.py",
        description="Convert a Hugging Face LlamaForCausalLM folder (config.json + model.safetensors, sharded or "
                    "not) into a nanotronix checkpoint that `checkpoint.resume` can start a run from.")
    p.add_argument("--hf", type=user_path, required=True, help="Hugging Face model folder")
    p.add_argument("--output", type=user_path, required=True, help="checkpoint folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from nanotronix.errors import UserError

    try:
        from nanotronix.checkpoint.hf_import import import_from_hf

        import_from_hf(args.hf, args.output, overwrite=args.overwrite, progress=not args.no_progress)
    except (UserError, FileNotFoundError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
