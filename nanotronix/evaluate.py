"""`python -m nanotronix.evaluate --checkpoint CKPT_DIR --data PREFIX --seq-len L --num-samples K [--json]
[--batch-size B] [--device auto|cpu|cuda] [--no-progress]`

The mean next-token loss of a checkpoint over the first K windows of a token store, window i being tokens
[i*L, i*L + L + 1) of the store's concatenated token stream (no shuffling): inputs are its first L tokens, targets
its last L. Every window has L targets, so the result is the mean over all K*L targets, a number any other
implementation (e.g. transformers on the exported model) can recompute exactly. A checkpoint trained with document
masking (model.document_mask_eos_id) is scored with it, as the trainer's validation does; the Hugging Face export
carries no such mask, so transformers recomputes such a checkpoint's loss with attention across documents.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from nanotronix.cli import ArgumentParser, integer, one_line_errors, user_path
from nanotronix.errors import fail


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m nanotronix.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=user_path, required=True, help="a step folder or a run's checkpoint folder")
    p.add_argument("--data", type=user_path, required=True, help="token store (Megatron prefix, datatrove .ds, zarr)")
    p.add_argument("--seq-len", type=integer, required=True, help="L: input tokens per window")
    p.add_argument("--num-samples", type=integer, required=True, help="K: number of windows")
    p.add_argument("--batch-size", type=integer, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
    return p.parse_args(argv)


def evaluate(checkpoint: str, data: str, seq_len: int, num_samples: int, batch_size: int = 8,
             device: str = "auto", progress: bool = False) -> dict[str, Any]:
    from nanotronix.checkpoint.reader import CheckpointReader
    from nanotronix.data import (document_eos_mismatch, first_outside_vocabulary, open_store, require_integer_tokens,
                                 tokenizer_note)
    from nanotronix.distributed import pick_device
    from nanotronix.errors import UserError
    from nanotronix.model import build_model

    for name, value in (("--seq-len", seq_len), ("--num-samples", num_samples), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{name}: must be >= 1, got {value}")
    store = require_integer_tokens(open_store(data), data)
    needed = num_samples * seq_len + 1
    if needed > store.num_tokens:
        raise UserError(f"--num-samples: {num_samples} windows of {seq_len} tokens need {needed} tokens, the store "
                        f"{data} has {store.num_tokens}")
    reader = CheckpointReader(checkpoint)
    cfg = reader.model_config
    if store.vocab_size is not None and store.vocab_size > cfg.vocab_size:  # refused as the trainer's validation does
        raise UserError(f"--data: {data} was tokenized with {store.vocab_size} tokens, more than the model's "
                        f"vocabulary ({cfg.vocab_size}): not the checkpoint's tokenizer")
    # the tokenizer the checkpoint's run names (data.tokenizer) against the one that wrote the store
    run_tokenizer = (reader.manifest["config"].get("data") or {}).get("tokenizer")
    note = tokenizer_note({data: store}, run_tokenizer, evaluated=True)
    wrong_eos = document_eos_mismatch({data: store}, cfg.document_mask_eos_id)
    if wrong_eos:
        raise UserError(wrong_eos)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if seq_len > cfg.max_position_embeddings:  # as the trainer refuses it: positions the model never learned
        raise UserError(f"--seq-len: {seq_len} exceeds the checkpoint's max_position_embeddings="
                        f"{cfg.max_position_embeddings}")
    dev = pick_device(device, "--device")
    model = build_model(cfg, attn_backend="sdpa", device=dev)
    reader.load_into(model)
    model.eval()

    from tqdm import tqdm

    total = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=num_samples, unit="window", desc="evaluate", disable=not progress)
    with torch.no_grad(), bar:
        for first in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - first)
            windows = store.leading_windows(first, count, seq_len)
            bad = first_outside_vocabulary(windows, cfg.vocab_size)  # negative ids too: a damaged int32 store
            if bad is not None:
                raise UserError(f"--data: {data}: token id {bad} is outside the model's vocabulary ({cfg.vocab_size})")
            windows = torch.from_numpy(windows).to(dev)
            logits = model(windows[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
            total += loss.double().cpu()
            bar.update(count)
    tokens = num_samples * seq_len
    return {"loss": (total / tokens).item(), "checkpoint": str(reader.folder), "step": reader.step, "data": data,
            "seq_len": seq_len, "num_samples": num_samples, "tokens": tokens}


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from nanotronix.errors import UserError

    try:
        result = evaluate(args.checkpoint, args.data, args.seq_len, args.num_samples, args.batch_size, args.device,
                          progress=not args.no_progress)
    except (UserError, FileNotFoundError) as e:
        return fail(e)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.6f} over {result['num_samples']} windows x {result['seq_len']} tokens "
              f"({result['checkpoint']}, step {result['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
