#!/usr/bin/env python
"""Export a nanotronix checkpoint (saved in any TP x PP x DP layout) as a Hugging Face LlamaForCausalLM folder.

    python tools/convert_to_hf.py --checkpoint CKPT_DIR --output HF_DIR [--dtype bfloat16] [--push-to-hub REPO]

CKPT_DIR is one step folder (checkpoints/step_0000200) or a run's checkpoint folder (its latest complete step).
Runs on CPU and streams one tensor at a time, so a 1.7B checkpoint converts in bounded memory.
"""
from __future__ import annotations

import argparse
import sys

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)
from nanotronix.cli import ArgumentParser, one_line_errors, user_path
from nanotronix.errors import fail


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="tools/convert_to_hf.py",
        description="Export a nanotronix checkpoint to a Hugging Face LlamaForCausalLM folder (config.json, "
                    "generation_config.json, model.safetensors (sharded with an index above the shard size), "
                    "tokenizer files when the run's tokenizer is known).")
    p.add_argument("--checkpoint", type=user_path, required=True, help="a step folder or a run's checkpoint folder")
    p.add_argument("--output", type=user_path, required=True, help="folder to create")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the exported weights (default: float32, lossless)")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size (default 5GB)")
    p.add_argument("--tokenizer", type=user_path, default=None,
                   help="tokenizer to ship (path or Hub id); default: the run's data.tokenizer, when loadable")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to this Hub repo (owner/name)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from nanotronix.errors import UserError

    if args.private and not args.push_to_hub:
        return fail("--private: applies to the Hub repo that --push-to-hub creates; give --push-to-hub REPO too")
    try:
        from nanotronix.checkpoint.hub import check_hub_access, push_folder

        if args.push_to_hub:
            check_hub_access(args.push_to_hub)  # fail before converting (and before importing torch)
        from nanotronix.checkpoint.hf_export import export_to_hf, parse_size

        folder = export_to_hf(args.checkpoint, args.output, dtype=args.dtype,
                              max_shard_bytes=parse_size(args.max_shard_size), tokenizer=args.tokenizer,
                              overwrite=args.overwrite, progress=not args.no_progress)
        if args.push_to_hub:
            print(f"pushed to {push_folder(folder, args.push_to_hub, args.private)}")
    except (UserError, FileNotFoundError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
