"""Building blocks of the Hugging Face conversion tests (tests/test_convert_hf_*.py): the two commands run as a
subprocess or in this process, a tiny trained checkpoint, a tiny model saved by transformers itself, a tiny
tokenizer, and the reads of an export (its tensors, its logits beside ours)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from checkpoint_helpers import TINY, adamw, plain_model, save_single, train_steps
from helpers import ROOT, load_tool, train_tiny_tokenizer


def cli(tool: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{tool}", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=180, env={**os.environ, **(env or {})})



def trained_checkpoint(run_dir: Path, cfg=TINY, config: dict | None = None):
    model = plain_model(cfg)
    opt = adamw(model)
    train_steps(model, opt, range(1, 3), cfg)
    return save_single(run_dir, 2, model, opt, config=config), model



def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out



def logits_match(hf_dir: Path, model, cfg) -> float:
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(input_ids=ids).logits - model(ids)).abs().max().item()



def byte_tokenizer(folder: Path) -> Path:
    """FOLDER/tokenizer.json: the tiny byte-level tokenizer with its 256 byte tokens and <|endoftext|> (id 0) only,
    no merges (a vocabulary that small leaves no room for one), so the tokens a test adds still fit WITH_BYTES."""
    return train_tiny_tokenizer(folder / "tokenizer.json", vocab_size=257)


# the byte tokenizer's 257 tokens and the few a test adds fit this vocabulary
WITH_BYTES = dataclasses.replace(TINY, vocab_size=320)



def _hf_original(folder: Path, untied: bool, dtype=torch.float32) -> Path:
    """A tiny SmolLM2-shaped model saved by transformers itself, with the extra keys SmolLM2's config carries."""
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                                   rope_theta=130000.0, rms_norm_eps=1e-5, tie_word_embeddings=not untied,
                                   bos_token_id=0, eos_token_id=0, initializer_range=0.03)
    cfg.is_llama_config = True
    cfg.rope_interleaved = False
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder)
    return folder



def tool_main(name: str):
    """main() of tools/NAME.py, to run the command's own code in this process."""
    return load_tool(name).main
