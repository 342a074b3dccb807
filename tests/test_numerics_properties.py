"""Property-based tests (hypothesis) of the model's hand-written numerics on CPU, each against a reference written
independently of the code under test (the fixed-shape checks are in test_document_masking.py, test_speedups.py and
test_kernels.py):

- document masking (model/documents.py), rows of 1-3 x 1-64 tokens with EOS anywhere (first, last, consecutive,
  none): document ids, positions, lengths, cu_seqlens and the longest document equal a walk over the tokens; the
  boolean mask is a causal block per document; RoPE's cos/sin restart with each document; masked attention (sdpa,
  eager; FlexAttention's compiled CPU forward) equals causal attention run on each document alone, and a packed
  model with document masking equals transformers' LlamaForCausalLM run on each document alone;
- the fused, chunked head + loss (model/loss.py: linear_cross_entropy) over 1-300 tokens, vocabularies of 2-500,
  hidden sizes 1-64 and any chunk size equals F.cross_entropy of the full logits in fp64 (loss and the gradients
  w.r.t. the hidden states and the head weight, for whichever of them requires grad, under any incoming gradient),
  fp32 tightly, bf16 (autocast or bf16 tensors) within a tolerance stated in units of bf16's rounding;
  `cross_entropy` (every reduction, labels at the ignore index -100 included) equals log-sum-exp minus the label's
  logit, and its gradient softmax minus one-hot;
- RoPE (model/rope.py) equals transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb for even head dims 2-128,
  rope_theta 1-1e9, contiguous, per-document and arbitrary positions, fp32 and bf16;
- the fused kernels' PyTorch twins (kernels/reference.py, reached through kernels/functions.py and the fused
  layers) equal the plain modules, forward and backward: add + RMSNorm and RMSNorm against model/norm.RMSNorm, the
  fused decoder layer (RoPE fused into the QKV split, add + RMSNorm, SwiGLU) against the plain DecoderLayer, in fp32
  and under bf16 autocast.

The vocabulary-parallel losses (parallel/cross_entropy.py) need a process group: their properties are in
tests/test_parallel_properties.py (gloo groups of 2-4 ranks), their fixed-shape examples in test_parallel_layers.py.
`linear_cross_entropy`'s labels include some at the ignore index -100 in some examples (never all: the mean of no
tokens, nan, is an example test in test_speedups.py). Costs ~15 s on one core."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from convert_hf_helpers import hf_twin
from helpers import walk_documents
from properties import PROPERTY, log_uniform

from nanotronix import accel
from nanotronix.config import ModelConfig
from nanotronix.convert.hf_mapping import to_hf_state_dict
from nanotronix.kernels import add_rms_norm, rms_norm
from nanotronix.model import build_model, cross_entropy
from nanotronix.model.documents import Documents
from nanotronix.model.llama import DecoderLayer
from nanotronix.model.loss import linear_cross_entropy
from nanotronix.model.norm import RMSNorm
from nanotronix.model.rope import apply_rope, rope_cos_sin
from nanotronix.parallel.speedups import apply_fused_kernels

EOS = 5
BF16_EPS = 2.0 ** -8  # half the spacing of bf16 numbers in [1, 2) (2^-7): the largest relative error of a rounding


def seeded(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))


@st.composite
def token_rows(draw, max_len: int = 64) -> torch.Tensor:
    """[1-3, 1-max_len] ids, a third of them EOS (so first, last, consecutive and no EOS all come up)."""
    rows, length = draw(st.integers(1, 3)), draw(st.integers(1, max_len))
    row = st.lists(st.sampled_from([EOS, 0, 9]), min_size=length, max_size=length)
    return torch.tensor(draw(st.lists(row, min_size=rows, max_size=rows)))


def document_spans(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, first token, end) of every document, row by row: a document ends after an EOS or at the row's end."""
    spans = []
    for b in range(ids.shape[0]):
        start = 0
        for s in range(ids.shape[1]):
            if ids[b, s] == EOS or s == ids.shape[1] - 1:
                spans.append((b, start, s + 1))
                start = s + 1
    return spans


def close(got: torch.Tensor, want: torch.Tensor, rel: float, floor: float = 0.0, what: str = "") -> None:
    """|got - want| <= rel * max|want| + floor everywhere (a tolerance on the tensor's scale, not per element)."""
    assert got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    bound = rel * (want.double().abs().max().item() if want.numel() else 0.0) + floor
    assert err <= bound, f"{what} max error {err:.3g} > {bound:.3g}"


# ---- document masking


@settings(PROPERTY, max_examples=200)
@given(ids=token_rows())
def test_document_layout_is_the_walk_over_the_tokens(ids):
    documents = Documents.from_tokens(ids, EOS)
    want_ids, want_positions = walk_documents(ids, EOS)
    assert torch.equal(documents.ids, want_ids) and torch.equal(documents.positions, want_positions)
    spans = document_spans(ids)
    lengths = [end - start for _, start, end in spans]
    cu, longest = documents.cu_seqlens
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert longest == max(lengths) and documents.lengths.tolist() == lengths
    mask = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    for b, start, end in spans:
        mask[b, 0, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(documents.attention_mask, mask)
    cos, sin = rope_cos_sin(documents.positions, 8, 10000.0)
    for b, start, end in spans:  # RoPE restarts: each document gets the angles of a window of its own
        alone = rope_cos_sin(torch.arange(end - start), 8, 10000.0)
        assert torch.equal(cos[b, start:end], alone[0]) and torch.equal(sin[b, start:end], alone[1])


def causal_attention_per_document(q, k, v, spans) -> torch.Tensor:
    """Softmax attention written out in fp64, run on each document alone (query head h reads KV head h // r)."""
    r = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, start, end in spans:
        qd, kd, vd = (t[b, :, start:end].double() for t in (q, k, v))
        kd, vd = kd.repeat_interleave(r, 0), vd.repeat_interleave(r, 0)
        scores = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        out[b, :, start:end] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vd
    return out


@st.composite
def attention_inputs(draw, max_len: int = 64):
    ids = draw(token_rows(max_len))
    kv, r, d = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 16))
    g = seeded(draw)
    b, s = ids.shape
    q, k, v = torch.randn(b, kv * r, s, d, generator=g), torch.randn(b, kv, s, d, generator=g), \
        torch.randn(b, kv, s, d, generator=g)
    return ids, q, k, v, torch.randn(b, kv * r, s, d, generator=g)


@settings(PROPERTY, max_examples=150)
@given(inputs=attention_inputs(), backend=st.sampled_from(["sdpa", "eager"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_masked_attention_is_causal_attention_on_each_document_alone(inputs, backend, dtype):
    ids, q, k, v, grad = inputs
    q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    out = accel.ATTENTION_BACKENDS[backend](q, k, v, Documents.from_tokens(ids, EOS))
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = causal_attention_per_document(*ref_inputs, document_spans(ids))
    # fp32: rounding only; bf16: probabilities and outputs rounded to 8 bits (outputs are averages of |v| <~ 5)
    rel = 1e-5 if dtype == torch.float32 else 4 * BF16_EPS
    assert out.dtype == dtype
    close(out, ref, rel, floor=rel)
    out.backward(grad.to(dtype))
    ref.backward(grad.double())
    for got, want in zip((q, k, v), ref_inputs):
        close(got.grad, want.grad, 10 * rel, floor=10 * rel)


@settings(PROPERTY, max_examples=3)
@given(inputs=attention_inputs(max_len=40))
def test_flex_attention_cpu_forward_is_causal_attention_on_each_document_alone(inputs):
    """FlexAttention compiled for the CPU (forward only: torch has no CPU backward); a few shapes, each compiles."""
    ids, q, k, v, _ = inputs
    out = accel.ATTENTION_BACKENDS["flex"](q, k, v, Documents.from_tokens(ids, EOS))
    close(out, causal_attention_per_document(q, k, v, document_spans(ids)), 1e-5, floor=1e-5)


@st.composite
def masked_models(draw) -> ModelConfig:
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([2, 4, 6, 8, 16]))
    return ModelConfig(hidden_size=heads * head_dim, intermediate_size=draw(st.integers(1, 48)),
                       num_hidden_layers=draw(st.integers(1, 2)), num_attention_heads=heads,
                       num_key_value_heads=draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0])),
                       vocab_size=draw(st.integers(EOS + 2, 64)), max_position_embeddings=32,
                       rope_theta=draw(st.one_of(st.just(10000.0), log_uniform(1.0, 1e6))), rms_norm_eps=1e-5,
                       tie_word_embeddings=draw(st.booleans()), init_std=draw(log_uniform(0.02, 0.2)),
                       document_mask_eos_id=EOS)


@settings(PROPERTY, max_examples=30)
@given(data=st.data(), cfg=masked_models(), backend=st.sampled_from(["sdpa", "eager"]))
def test_packed_model_equals_transformers_on_each_document_alone(data, cfg, backend):
    layout = data.draw(token_rows(max_len=32), label="layout")
    # other tokens than EOS drawn from the whole vocabulary, where the layout has no EOS
    filler = torch.randint(EOS + 1, cfg.vocab_size, layout.shape, generator=seeded(data.draw))
    ids = torch.where(layout == EOS, EOS, filler)
    torch.manual_seed(data.draw(st.integers(0, 2 ** 31 - 1), label="init seed"))
    ours = build_model(cfg, attn_backend=backend)
    hf = hf_twin(cfg)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    with torch.no_grad():
        logits = ours(ids)
        for b, start, end in document_spans(ids):
            want = hf(input_ids=ids[b:b + 1, start:end]).logits[0]
            close(logits[b, start:end], want, 1e-5, floor=1e-5)


# ---- the fused head + chunked loss, and cross_entropy


@st.composite
def head_and_labels(draw):
    """hidden [n, D] or [b, n / b, D], head weight [V, D], labels (none, some or all but one at the ignore index
    -100), a chunk size (dividing n or not, or past n)."""
    n, vocab, dim = draw(st.integers(1, 300)), draw(st.integers(2, 500)), draw(st.integers(1, 64))
    rows = draw(st.sampled_from([b for b in (1, 2, 3) if n % b == 0]))
    chunk = draw(st.one_of(st.integers(1, n + 20), st.sampled_from([d for d in range(1, n + 1) if n % d == 0])))
    g = seeded(draw)
    # logits hidden @ weight.T of standard deviation `spread` (0.1: near uniform softmax; 10: near one-hot)
    spread = draw(log_uniform(0.1, 10.0))
    hidden = torch.randn(n, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * spread / math.sqrt(dim)
    labels = torch.randint(0, vocab, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    ignored[torch.randint(0, n, (), generator=g)] = False
    labels[ignored] = -100
    shape = (rows, n // rows) if rows > 1 else (n,)
    return hidden.view(*shape, dim), weight, labels.view(shape), chunk


def full_logits_loss_and_grads(hidden, weight, labels, grad_loss, wants):
    """F.cross_entropy of the whole logits in fp64, and its gradients w.r.t. hidden and weight."""
    h, w = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    loss = F.cross_entropy(F.linear(h, w).flatten(0, -2), labels.flatten())
    loss.backward(torch.tensor(grad_loss, dtype=torch.float64))
    return loss.item(), h.grad if wants[0] else None, w.grad if wants[1] else None


GRAD_WANTED = st.sampled_from([(True, True), (True, False), (False, True)])


@settings(PROPERTY, max_examples=150)
@given(case=head_and_labels(), wants=GRAD_WANTED, grad_loss=log_uniform(0.1, 10.0))
def test_linear_cross_entropy_fp32_equals_cross_entropy_of_the_full_logits(case, wants, grad_loss):
    hidden, weight, labels, chunk = case
    hidden.requires_grad_(wants[0]), weight.requires_grad_(wants[1])
    loss = linear_cross_entropy(hidden, weight, labels, chunk)
    loss.backward(torch.tensor(grad_loss))
    ref_loss, ref_gh, ref_gw = full_logits_loss_and_grads(hidden, weight, labels, grad_loss, wants)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss) <= 1e-5 * (1 + ref_loss)
    n = (labels != -100).sum().item()  # the tokens counted: each one's gradient is scaled by 1/n
    for t, ref, other in ((hidden, ref_gh, weight), (weight, ref_gw, hidden)):
        if ref is None:
            assert t.grad is None
        else:  # floor: fp32 rounding of softmax - onehot (scale 1) times grad_loss / n times the other factor
            assert t.grad.dtype == torch.float32
            close(t.grad, ref, 1e-5, floor=1e-6 * grad_loss / n * other.abs().max().item())


@settings(PROPERTY, max_examples=100)
@given(case=head_and_labels(), wants=GRAD_WANTED, autocast=st.booleans())
def test_linear_cross_entropy_bf16_is_within_bf16_rounding_of_the_full_logits(case, wants, autocast):
    """bf16 matmuls (fp32 weights under autocast, as the trainer runs, or bf16 tensors). Rounding hidden and weight
    to bf16 (relative 2^-9 each) moves a logit hidden . w_v (hidden ~ N(0, 1)) by a few 2^-9 of |w_v|, and the loss
    by no more than its logits. Stated: the loss within 4 * 2^-8 * (1 + max |w_v|); each gradient, rounded to bf16
    once more, within 8 * 2^-8 of its largest entry, plus 8 * 2^-8 of the scale of softmax - onehot's product
    (1/n times max |entry| of the other factor) for gradients that nearly cancel."""
    hidden, weight, labels, chunk = case
    if not autocast:
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
    hidden.requires_grad_(wants[0]), weight.requires_grad_(wants[1])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = linear_cross_entropy(hidden, weight, labels, chunk)
    loss.backward()
    ref_loss, ref_gh, ref_gw = full_logits_loss_and_grads(hidden, weight, labels, 1.0, wants)
    spread = weight.double().norm(dim=1).max().item()  # max |w_v|: the largest logit standard deviation
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss) <= 4 * BF16_EPS * (1 + spread)
    n = (labels != -100).sum().item()
    for t, ref, other in ((hidden, ref_gh, weight), (weight, ref_gw, hidden)):
        if ref is None:
            assert t.grad is None
            continue
        assert t.grad.dtype == t.dtype
        close(t.grad, ref, 8 * BF16_EPS, floor=8 * BF16_EPS * other.double().abs().max().item() / n)


@st.composite
def logits_and_labels(draw):
    """logits [n, V] or [b, n / b, V] spread 0.1-30, fp32 or bf16; labels with some at the ignore index -100."""
    n, vocab = draw(st.integers(1, 300)), draw(st.integers(2, 500))
    rows = draw(st.sampled_from([b for b in (1, 2, 3) if n % b == 0]))
    g = seeded(draw)
    logits = torch.randn(n, vocab, generator=g) * draw(log_uniform(0.1, 30.0))
    labels = torch.randint(0, vocab, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    shape = (rows, n // rows) if rows > 1 else (n,)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return logits.to(dtype).view(*shape, vocab), torch.where(ignored, -100, labels).view(shape)


@settings(PROPERTY, max_examples=150)
@given(case=logits_and_labels(), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_is_log_sum_exp_minus_the_label_logit(case, reduction):
    logits, labels = case
    logits.requires_grad_(True)
    loss = cross_entropy(logits, labels, reduction=reduction)
    x, y = logits.detach().double().flatten(0, -2), labels.flatten()
    kept = y != -100
    per_token = torch.where(kept, x.logsumexp(-1) - x.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    count = int(kept.sum())
    want = {"none": per_token, "sum": per_token.sum(),
            "mean": per_token.sum() / count if count else torch.tensor(float("nan"), dtype=torch.float64)}[reduction]
    assert loss.dtype == torch.float32  # computed in fp32 whatever the logits' dtype
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
    if reduction == "mean" and not count:
        return  # nan: no gradient to speak of
    # d(sum or mean)/d(logits) = (softmax - onehot) per kept token, / count for the mean
    weight = torch.randn(per_token.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
    loss.backward(weight.float())
    onehot = F.one_hot(y.clamp(min=0), x.shape[-1]).double()
    scale = (weight.flatten() if reduction == "none" else torch.full_like(per_token, 1.0 / count
                                                                          if reduction == "mean" else 1.0))
    want_grad = ((x.softmax(-1) - onehot) * (scale * kept)[:, None]).view(logits.shape)
    assert logits.grad.dtype == logits.dtype
    # softmax - onehot is made in fp32 on the scale of 1 (1 - p of a near-certain label keeps no more digits)
    rel = 1e-5 if logits.dtype == torch.float32 else 2 * BF16_EPS
    close(logits.grad, want_grad, rel, floor=rel * scale.abs().max().item())


# ---- RoPE against transformers


@st.composite
def positions(draw) -> torch.Tensor:
    """[S] contiguous from an offset, [B, S] restarting per document, or [B, S] arbitrary (up to 2^16)."""
    kind = draw(st.sampled_from(["contiguous", "documents", "arbitrary"]))
    if kind == "contiguous":
        return torch.arange(draw(st.integers(1, 64))) + draw(st.integers(0, 4096))
    if kind == "documents":
        return Documents.from_tokens(draw(token_rows()), EOS).positions
    b, s = draw(st.integers(1, 3)), draw(st.integers(1, 64))
    return torch.randint(0, 2 ** 16, (b, s), generator=seeded(draw))


@settings(PROPERTY, max_examples=200)
@given(data=st.data(), pos=positions(), head_dim=st.integers(1, 64).map(lambda h: 2 * h),
       theta=st.one_of(st.just(10000.0), log_uniform(1.0, 1e9)), heads=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_rope_equals_transformers(data, pos, head_dim, theta, heads, dtype):
    g = seeded(data.draw)
    b, s = (1, pos.shape[0]) if pos.dim() == 1 else pos.shape
    q, k = (torch.randn(b, heads, s, head_dim, generator=g).to(dtype) for _ in range(2))
    hf_cfg = transformers.LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim,
                                      rope_theta=theta, max_position_embeddings=2 ** 17)
    position_ids = pos if pos.dim() == 2 else pos[None]
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_cfg)(q, position_ids)  # [B, S, D] in q's dtype
    cos, sin = rope_cos_sin(pos, head_dim, theta)
    assert cos.dtype == torch.float32 and cos.shape == (*pos.shape, head_dim)
    torch.testing.assert_close(cos.expand(b, s, head_dim).to(dtype), hf_cos)
    torch.testing.assert_close(sin.expand(b, s, head_dim).to(dtype), hf_sin)
    want_q, want_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), want_q)
    torch.testing.assert_close(apply_rope(k, cos, sin), want_k)


# ---- the fused kernels' PyTorch twins against the plain modules


@st.composite
def norm_inputs(draw):
    """x [1-3, 1-17, 1-96] of scale 1e-2-1e2, a residual delta or none, a random gain, eps 1e-12-1e-1."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 17)), draw(st.integers(1, 96)))
    g = seeded(draw)
    x = torch.randn(shape, generator=g) * draw(log_uniform(1e-2, 1e2))
    delta = torch.randn(shape, generator=g) * draw(log_uniform(1e-2, 1e2)) if draw(st.booleans()) else None
    gain = torch.randn(shape[-1], generator=g) * 0.5 + 1
    eps = draw(st.one_of(st.just(1e-5), log_uniform(1e-12, 1e-1)))
    return x, delta, gain, eps, [torch.randn(shape, generator=g) for _ in range(2)]


@settings(PROPERTY, max_examples=150)
@given(case=norm_inputs(), bf16=st.booleans())
def test_add_rms_norm_twin_equals_the_residual_add_and_the_plain_rmsnorm(case, bf16):
    """Under bf16 autocast (as the trainer runs) the residual and its gradients stay fp32 and the fused op only
    rounds its output to bf16, which the plain path's next matmul would do: gradients are as tight as in fp32."""
    x, delta, gain, eps, (g_out, g_res) = case
    if bf16 and delta is not None:
        delta = delta.bfloat16()  # the attention's output under autocast
    norm = RMSNorm(x.shape[-1], eps)
    norm.weight.data.copy_(gain)
    fused_norm = copy.deepcopy(norm)
    inputs = [t.clone().requires_grad_(True) for t in (x, delta) if t is not None]
    fused_inputs = [t.clone().requires_grad_(True) for t in (x, delta) if t is not None]
    g_out = g_out.bfloat16().float() if bf16 else g_out  # one upstream gradient both paths can take exactly
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = inputs[0] + inputs[1] if delta is not None else inputs[0]
        out = norm(h)
        if delta is not None:
            got, res = add_rms_norm(*fused_inputs, fused_norm.weight, eps)
            close(res, h, 0.0)
            torch.autograd.backward((got, res), (g_out.to(got.dtype), g_res))
            torch.autograd.backward((out, h), (g_out, g_res))
        else:
            got = rms_norm(fused_inputs[0], fused_norm.weight, eps)
            got.backward(g_out.to(got.dtype))
            out.backward(g_out)
    assert got.dtype == (torch.bfloat16 if bf16 else torch.float32)
    close(got, out, BF16_EPS if bf16 else 1e-5)
    # The gradients cancel (w.r.t. x: g*w*rstd minus its projection on x; it vanishes for one channel), so their
    # fp32 rounding is on the scale of the terms, not of the result.
    hd = h.detach().double()
    rstd = (hd.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    x_scale = (g_out.abs() * gain.abs() * rstd).max().item()
    w_scale = (g_out.abs() * (hd * rstd).abs()).flatten(0, -2).sum(0).max().item()
    scales = [x_scale] * len(inputs) + [w_scale]
    for fused_t, t, scale in zip(fused_inputs + [fused_norm.weight], inputs + [norm.weight], scales):
        assert fused_t.grad.dtype == t.grad.dtype
        # a bf16 gradient (the attention output's) is the fp32 one rounded: fp32 values a few ulps apart can round to
        # neighbouring bf16 numbers, one bf16 spacing apart (found by a random-seed run: 2^-8 at a gradient of ~1)
        rel = BF16_EPS if t.grad.dtype == torch.bfloat16 else 1e-4
        close(fused_t.grad, t.grad, rel, floor=1e-5 * scale)


@st.composite
def decoder_layers_and_inputs(draw):
    heads = draw(st.integers(1, 6))
    head_dim = draw(st.sampled_from([d for d in range(2, 33, 2) if heads * d <= 96]))
    cfg = ModelConfig(hidden_size=heads * head_dim, intermediate_size=draw(st.integers(1, 96)),
                      num_hidden_layers=1, num_attention_heads=heads,
                      num_key_value_heads=draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0])),
                      vocab_size=8, max_position_embeddings=32, rms_norm_eps=draw(log_uniform(1e-8, 1e-2)),
                      rope_theta=draw(st.one_of(st.just(10000.0), log_uniform(1.0, 1e6))),
                      tie_word_embeddings=True, init_std=draw(log_uniform(0.02, 0.3)))
    b, s = draw(st.integers(1, 2)), draw(st.integers(1, 24))
    torch.manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    layer = build_model(cfg).layers["0"]
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.weight.data.normal_(1.0, 0.3)
    return cfg, layer, torch.randn(b, s, cfg.hidden_size), torch.randn(b, s, cfg.hidden_size)


@settings(PROPERTY, max_examples=60)
@given(case=decoder_layers_and_inputs(), bf16=st.booleans())
def test_fused_decoder_layer_twins_equal_the_plain_layer(case, bf16):
    """The fused layer (RMSNorm, RoPE fused with the QKV split, add + RMSNorm, SwiGLU twins) against the plain
    DecoderLayer holding the same weights: output and every gradient, in fp32 tightly. Under bf16 autocast both are
    held to the plain layer in fp64: the fused one no farther from it than the plain one plus a few bf16 roundings
    (the fused ops round once where the plain ones round after each bf16 op). Not fused against plain there: where
    the layer amplifies roundings (a saturated softmax), the two bf16 paths land far apart, the plain one the
    farther (a random-seed run: input gradients 5.9% and 1.8% of their scale from fp64's)."""
    cfg, plain, x, grad = case
    fused = apply_fused_kernels(copy.deepcopy(plain))
    assert isinstance(plain, DecoderLayer) and type(fused).__name__ == "FusedDecoderLayer"
    cos, sin = rope_cos_sin(torch.arange(x.shape[1]), cfg.head_dim, cfg.rope_theta)
    runs = [(plain, torch.float32, bf16), (fused, torch.float32, bf16)]
    if bf16:
        runs.append((copy.deepcopy(plain).double(), torch.float64, False))
    results = []
    for layer, dtype, autocast in runs:
        inp = x.to(dtype, copy=True).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(inp, cos.to(dtype), sin.to(dtype))
        out.backward(grad.to(dtype))
        results.append([("output", out), ("input gradient", inp.grad)]
                       + [(n, p.grad) for n, p in layer.named_parameters()])
    assert [n for n, _ in results[0]] == [n for n, _ in results[1]]
    if not bf16:  # the input's gradient goes back through every op of the layer, the weights' through most
        for (name, want), (_, got) in zip(*results):
            rel = {"output": 1e-5, "input gradient": 2e-5}.get(name, 4e-5)
            close(got, want, rel, floor=1e-30, what=name)
        return
    for (name, plain_t), (_, fused_t), (_, exact) in zip(*results):
        scale = exact.abs().max().item()
        plain_err, fused_err = ((t.double() - exact).abs().max().item() for t in (plain_t, fused_t))
        assert fused_err <= plain_err + 8 * BF16_EPS * scale + 1e-30, \
            f"{name}: fused {fused_err:.3g} from fp64, plain {plain_err:.3g}, scale {scale:.3g}"
