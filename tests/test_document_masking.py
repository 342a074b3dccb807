"""Document masking (`model.document_mask_eos_id`): every document of a packed window is computed as if it stood
alone. Reference: transformers' LlamaForCausalLM run on each document separately, holding the same weights.
The FlashAttention-2 varlen path (flash-attn is not installed here) is checked against SDPA through a stand-in that
follows `flash_attn_varlen_func`'s documented contract (one causal sequence per `cu_seqlens` segment).
Layouts with document masking (TP + sequence parallel + pipeline) are in tests/test_parallel_layouts.py.
"""
import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
import transformers

from helpers import requires_cuda, walk_documents
from nanotronix import accel
from nanotronix.config import ConfigError, ModelConfig, config_from_dict
from nanotronix.convert.hf_mapping import hf_config_dict, to_hf_state_dict
from nanotronix.model import build_model
from nanotronix.model.documents import Documents

EOS = 5
CFG = ModelConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, init_std=0.05, document_mask_eos_id=EOS)


def _packed(lengths_per_row, generator):
    """Rows of documents (random tokens other than EOS, each ended by EOS); returns ids [B, S] and each row's
    documents as lists of ids."""
    rows, docs = [], []
    for lengths in lengths_per_row:
        row = [torch.randint(EOS + 1, CFG.vocab_size, (n - 1,), generator=generator).tolist() + [EOS]
               for n in lengths]
        docs.append(row)
        rows.append(sum(row, []))
    return torch.tensor(rows), docs


def test_document_layout_ids_positions_and_cu_seqlens():
    g = torch.Generator().manual_seed(0)
    ids, docs = _packed([[4, 9, 1, 6], [20], [7, 13]], g)
    ids[2, -1] = 17  # the last document runs past the window (no EOS)
    documents = Documents.from_tokens(ids, EOS)
    want_ids, want_pos = walk_documents(ids, EOS)
    assert torch.equal(documents.ids, want_ids) and torch.equal(documents.positions, want_pos)
    cu, longest = documents.cu_seqlens
    lengths = [len(d) for row in docs for d in row]
    assert cu.tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist() and longest == max(lengths)
    mask = documents.attention_mask[:, 0]
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            for j in range(ids.shape[1]):
                assert mask[b, i, j] == (j <= i and want_ids[b, i] == want_ids[b, j])


def _hf(ours):
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(CFG).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), CFG), strict=False)
    return hf


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_documents_match_transformers_on_each_document(backend):
    torch.manual_seed(0)
    ours = build_model(CFG, attn_backend=backend)
    hf = _hf(ours)
    ids, docs = _packed([[5, 11, 3, 13], [17, 15]], torch.Generator().manual_seed(1))
    logits = ours(ids)
    for b, row in enumerate(docs):
        start = 0
        for doc in row:
            want = hf(input_ids=torch.tensor([doc])).logits[0]
            got = logits[b, start:start + len(doc)]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            start += len(doc)
    # and the mask matters: without it the later documents see their predecessors
    plain = build_model(dataclasses.replace(CFG, document_mask_eos_id=None), attn_backend=backend)
    plain.load_state_dict(ours.state_dict())
    assert (plain(ids)[0, 5:] - logits[0, 5:]).abs().max() > 1e-2


def test_flash_varlen_path_matches_sdpa(monkeypatch):
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):  # [T, heads, D], one sequence per segment
        assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
        outs = []
        for lo, hi in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            seg = [t[lo:hi].transpose(0, 1)[None] for t in (q, k, v)]
            outs.append(F.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        return torch.cat(outs)

    fake = types.SimpleNamespace(flash_attn_varlen_func=varlen)
    monkeypatch.setattr(accel, "_optional_module", lambda name: fake if name == "flash_attn" else None)
    ids, _ = _packed([[6, 10, 8], [4, 20]], torch.Generator().manual_seed(2))
    documents = Documents.from_tokens(ids, EOS)
    q = torch.randn(2, 6, 24, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)
    out = accel.ATTENTION_BACKENDS["flash_attention_2"](q, k, v, documents)
    ref = accel.ATTENTION_BACKENDS["sdpa"](q, k, v, documents)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_gradients_flow_per_document():
    """A loss on the second document's tokens has no gradient w.r.t. the first document's embeddings."""
    torch.manual_seed(0)
    model = build_model(CFG)
    ids, _ = _packed([[7, 9]], torch.Generator().manual_seed(3))
    h = model.embed_tokens(ids).detach().requires_grad_(True)
    from nanotronix.model.llama import decoder_forward
    documents = Documents.from_tokens(ids, EOS)
    model.embed_tokens, embed = None, model.embed_tokens
    out = decoder_forward(model, h, documents=documents)
    model.embed_tokens = embed
    out[0, 7:].sum().backward()
    assert h.grad[0, :7].abs().max() == 0 and h.grad[0, 7:].abs().max() > 0


@pytest.mark.parametrize("overrides,message", [
    ({"model": {"document_mask_eos_id": 101}}, "model.document_mask_eos_id"),
    ({"model": {"document_mask_eos_id": 0}, "train": {"fused_kernels": True}}, "train.fused_kernels"),
])
def test_config_rejects(overrides, message):
    base = {"model": {"preset": "smollm2-135m", "vocab_size": 101, "num_hidden_layers": 1},
            "train": {"seq_len": 16, "global_batch_size": 2, "micro_batch_size": 1}}
    for section, values in overrides.items():
        base[section].update(values)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(base)


# ---- model.attn_implementation: flex (FlexAttention with a block mask). torch has no FlexAttention backward on
# CPU: here the forward (compiled by Inductor for the CPU) is checked; forward and backward on CUDA below.

def _flex_vs_sdpa_forward(device: str, dtype: torch.dtype, grad: bool):
    torch.manual_seed(0)
    sdpa = build_model(CFG, attn_backend="sdpa" if device == "cpu" else "eager").to(device)
    flex = build_model(CFG, attn_backend="flex").to(device)
    flex.load_state_dict(sdpa.state_dict())
    ids, _ = _packed([[5, 11, 3, 13], [17, 15]], torch.Generator().manual_seed(1))
    ids = ids.to(device)
    with torch.set_grad_enabled(grad), torch.autocast(device, dtype, enabled=dtype != torch.float32):
        out = [model(ids).float() for model in (sdpa, flex)]
    return out, (sdpa, flex)


def test_flex_forward_matches_sdpa_within_documents():
    (want, got), _ = _flex_vs_sdpa_forward("cpu", torch.float32, grad=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # one block mask per forward, built before the layers and shared by them
    documents = Documents.from_tokens(_packed([[5, 11]], torch.Generator().manual_seed(2))[0], EOS)
    assert documents.prepare("flex").block_mask is documents.block_mask


def test_compiled_layers_with_flex_do_not_recompile_per_batch():
    """Every batch brings new document ids, so a new block mask and mask function: the compiled layers must take
    them as inputs (one graph), not specialise on them."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model(CFG, attn_backend="flex")
    for layer in model.layers.values():
        layer.compile()
    with torch.no_grad():
        for lengths in ([[5, 11, 3, 13], [17, 15]], [[9, 23], [3, 3, 26]], [[32], [1, 31]]):
            model(_packed(lengths, torch.Generator().manual_seed(3))[0])
    assert counters["stats"]["unique_graphs"] == 1


def test_flex_needs_cuda():
    with pytest.raises(accel.UserError, match="flex needs CUDA"):
        accel.resolve_attention("flex", torch.device("cpu"), "bfloat16")


def test_half_precision_only_attention_is_not_picked_or_taken_for_fp32(monkeypatch):
    """flash-attn's and cuDNN's attention kernels take fp16/bf16 only (flash-attn: "FlashAttention only support fp16
    and bf16 data type"): an fp32 run gets SDPA from `auto`, and a one-line refusal when it names them."""
    monkeypatch.setattr(accel, "flash_attn_available", lambda: True)
    cuda = torch.device("cuda")
    assert accel.resolve_attention("auto", cuda, "bfloat16") == "flash_attention_2"
    assert accel.resolve_attention("auto", cuda, "float32") == "sdpa"
    for backend in ("flash_attention_2", "sdpa_cudnn"):
        with pytest.raises(accel.UserError, match="runs in bf16 only"):
            accel.resolve_attention(backend, cuda, "float32")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["cuda-fp32", "cuda-bf16"])
def test_flex_forward_and_backward_match_masked_attention_on_cuda(dtype):
    """Tolerances: fp32 1e-4 (different summation order and exp implementation); bf16 3e-2 relative L2 (rounding
    of every matmul input and output, as between any two bf16 attention kernels)."""
    (want, got), (sdpa, flex) = _flex_vs_sdpa_forward("cuda", dtype, grad=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert ((got - want).norm() / want.norm()).item() < tol
    g = torch.randn_like(want)
    (want * g).sum().backward()
    (got * g).sum().backward()
    for (name, a), b in zip(sdpa.named_parameters(), flex.parameters()):
        assert ((b.grad - a.grad).norm() / a.grad.norm()).item() < tol, name


def test_a_mask_eos_other_than_the_stores_is_refused(tmp_path):
    """model.document_mask_eos_id must be the EOS the stores' sidecars record: another id would cut documents at an
    ordinary token and leave the real boundaries unmasked, silently. The trainer refuses it in one line (so do
    preflight and evaluate: tests/test_slurm_preflight.py); the stores' own id trains."""
    from checkpoint_helpers import train_in_process
    from helpers import tiny_config, write_learnable_store

    cfg = tiny_config(tmp_path, write_learnable_store(tmp_path / "arith"), train={"train_steps": 1})
    with pytest.raises(accel.UserError, match="model.document_mask_eos_id: 3, but token store .* ends its documents "
                                              "with id 0"):
        train_in_process(cfg, "model.document_mask_eos_id=3")
    assert train_in_process(cfg, "model.document_mask_eos_id=0")["steps"] == 1


def test_a_resume_that_turns_masking_on_or_off_says_so(tmp_path):
    from nanotronix.checkpoint.checkpointer import check_architecture

    saved = dataclasses.asdict(CFG)
    assert check_architecture(saved, {**saved, "document_mask_eos_id": None}, tmp_path) == [
        f"model.document_mask_eos_id: {EOS} in the checkpoint, None now"]
