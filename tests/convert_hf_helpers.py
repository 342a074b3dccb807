"""Building blocks of the Hugging Face conversion tests (tests/test_convert_hf_*.py): the two commands run as a
subprocess or in this process (`one_error_line`: a call that must fail in one line), a tiny trained checkpoint, a
tiny model saved by transformers itself, a tiny tokenizer, the reads of an export (its tensors, its logits beside
ours, two folders compared), and the model against transformers' LlamaForCausalLM of the same weights
(tests/test_model_hf_parity.py, tests/test_model_properties.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from checkpoint_helpers import TINY, adamw, plain_model, save_single, train_steps
from helpers import ROOT, load_tool, train_tiny_tokenizer

from nanotronix.config import ModelConfig
from nanotronix.convert.hf_mapping import hf_config_dict, to_hf_state_dict
from nanotronix.model import build_model, cross_entropy


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
    return saved_hf_llama(folder, dtype, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                          rope_theta=130000.0, rms_norm_eps=1e-5, tie_word_embeddings=not untied, bos_token_id=0,
                          eos_token_id=0, initializer_range=0.03)


def unigram_tokenizer(folder: Path) -> Path:
    """A tiny Unigram tokenizer.json in `folder` with a Metaspace pre-tokenizer and decoder (T5's kind: not BPE, so
    transformers 5 applies clean_up_tokenization_spaces when decoding it), <|endoftext|> its id 0; its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from helpers import CORPUS

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 20, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"], unk_token="<unk>", show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def conversion_source(tool: str, tmp_path: Path) -> list[str]:
    """The source arguments of a tiny conversion by `tool`: a trained checkpoint for convert_to_hf, a model saved by
    transformers for convert_from_hf (made under tmp_path)."""
    if tool == "convert_to_hf":
        trained_checkpoint(tmp_path / "run")
        return ["--checkpoint", str(tmp_path / "run")]
    return ["--hf", str(_hf_original(tmp_path / "hf", untied=False))]


def saved_hf_llama(folder: Path, dtype=torch.float32, seed: int = 0, **fields) -> Path:
    """FOLDER: a random LlamaForCausalLM of the LlamaConfig FIELDS (and the extra keys SmolLM2's config carries),
    saved by transformers' own save_pretrained."""
    cfg = transformers.LlamaConfig(**fields)
    cfg.is_llama_config = True
    cfg.rope_interleaved = False
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder)
    return folder


def assert_same_hf_folder(a: Path, b: Path) -> None:
    """Two Hugging Face folders hold the same tensors (names, dtypes, values), the same config as transformers reads
    it and the same generation config (but for the transformers version that wrote them)."""
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    ignore = {"transformers_version", "_name_or_path"}
    ca, cb = ({k: v for k, v in transformers.AutoConfig.from_pretrained(d).to_dict().items() if k not in ignore}
              for d in (a, b))
    assert ca == cb
    ga, gb = (json.loads((d / "generation_config.json").read_text()) for d in (a, b))
    ga.pop("transformers_version"), gb.pop("transformers_version")
    assert ga == gb


def hf_twin(cfg: ModelConfig) -> transformers.LlamaForCausalLM:
    """transformers' LlamaForCausalLM of the architecture CFG (fp32, eager attention, eval mode)."""
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(cfg).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(hf_cfg).float().eval()


def assert_matches_transformers(cfg: ModelConfig, backend: str, ids: torch.Tensor) -> None:
    """Our model of CFG (random init, attention BACKEND) and transformers' holding the same weights (loaded through
    the mapping, so the mapping is checked as well as the numerics) give the same logits for IDS[:, :-1] and the
    same gradients of the next-token loss on IDS[:, 1:] (fp32: 1e-5)."""
    ours = build_model(cfg, attn_backend=backend)
    hf = hf_twin(cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and (cfg.tie_word_embeddings or not missing)
    if cfg.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    logits = ours(ids[:, :-1])
    ref = hf(input_ids=ids[:, :-1]).logits
    assert (logits - ref).abs().max().item() < 1e-5

    cross_entropy(logits, ids[:, 1:]).backward()
    torch.nn.functional.cross_entropy(ref.flatten(0, 1), ids[:, 1:].flatten()).backward()
    our_grads = to_hf_state_dict({n: p.grad for n, p in ours.named_parameters()}, cfg)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert set(our_grads) == set(hf_grads)
    for n, g in our_grads.items():
        assert torch.allclose(g, hf_grads[n], atol=1e-5, rtol=1e-4), n


def tool_main(name: str):
    """main() of tools/NAME.py, to run the command's own code in this process."""
    return load_tool(name).main


def one_error_line(tool: str, *args: str) -> str:
    """Run tools/TOOL.py's main() in this process; it must fail (exit code 2) saying one line on stderr. (Its output is
    caught here, not with pytest's capsys: that fixture lives once for all the examples of a property.)"""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = tool_main(tool)([*args, "--no-progress"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    return lines[0]
