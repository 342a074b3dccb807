"""The per-GPU memory model of tools/plan.py: what each pipeline rank keeps at its peak, by kind (fp32 weights,
autocast's bf16 weight copies, fp32 gradients, AdamW's moments, activations with the pipeline stages' buffers and the
last stage's head and loss). tools/plan.py's docstring (its --help, "Memory") says what is counted and what is not.
tests/test_plan_memory.py holds these terms to what the model keeps on CPU, tests/test_plan_memory_parallel.py
those of pipeline and data-parallel layouts."""
from __future__ import annotations

from typing import Any

GIB = 1024 ** 3


def rank_chunks(cfg, pp_rank: int) -> list[tuple[int, int]]:
    """(global chunk id, decoder layers) of each pipeline chunk of rank `pp_rank`: the trainer's own partition, which
    balances compute with the head counted (`parallel.partition`), so the first ranks can hold more than layers/pp."""
    from nanotronix.parallel.partition import chunk_ids_of_rank, pipeline_chunks

    p = cfg.parallel
    layers = pipeline_chunks(cfg.model, cfg.train.seq_len, p.pp, p.virtual_stages)
    return [(c, len(layers[c])) for c in chunk_ids_of_rank(pp_rank, p.pp, p.virtual_stages)]


def chunk_forwards_at_peak(cfg, accum: int, pp_rank: int) -> list[tuple[int, int]]:
    """(forwards awaiting their backward, backwards done) of each chunk of rank `pp_rank` at its peak, as
    torch.distributed.pipelining's schedules run them (tests/test_plan_memory_parallel.py counts them): 1 without
    pipelining; all micro-batches with AFAB (GPipe: every forward first), on every rank; with 1F1B pp - pp_rank (the
    first rank pp, the last 1). Interleaved 1F1B: rank r runs (v - 1) x (micro-batches per round) + 2 (pp - 1 - r)
    forwards before its first backward (all of them at most), then a forward and a backward at a time, the
    backwards from its last chunk back, a round's micro-batches each: its last forward is its peak."""
    p = cfg.parallel
    if p.pp == 1:
        return [(1, 0)]
    if p.pp_schedule != "interleaved":
        return [(accum if p.pp_schedule == "afab" else min(accum, p.pp - pp_rank), 0)]
    v = p.virtual_stages
    per_round = accum // max(1, accum // p.pp)
    warmup = min((v - 1) * per_round + 2 * (p.pp - 1 - pp_rank), accum * v)
    done = [0] * v
    for k in range(accum * v - warmup - 1):  # the backwards before the last forward
        done[v - 1 - (k // per_round) % v] += 1
    return [(accum - d, d) for d in done]


def in_flight_microbatches(cfg, accum: int, pp_rank: int = 0) -> float:
    """Micro-batches whose activations pipeline rank `pp_rank` holds at its peak (`chunk_forwards_at_peak`), in
    forwards of all its chunks: with interleaved 1F1B on the first rank pp + (pp - 1) / virtual_stages when the step
    has two rounds (2 pp micro-batches) or more, all of them with one round; on the last rank more than one."""
    peak = chunk_forwards_at_peak(cfg, accum, pp_rank)
    return sum(forwards for forwards, _ in peak) / len(peak)


def pipeline_buffer_bytes(cfg, accum: int, pp_rank: int) -> float:
    """What the pipeline stages of rank `pp_rank` keep at its peak beside the layers' activations, in micro-batches'
    residual streams (fp32: the weights are fp32 and autocast leaves the residual so; split over TP under sequence
    parallelism). torch.distributed.pipelining's PipelineStage makes, once, a receive buffer per micro-batch of the
    step for the activations a chunk receives (every chunk but the model's first) and one for its output's gradient
    (every chunk but the last), and keeps them; a forward in flight keeps its chunk's output until its backward (its
    received activations are its first layer's input, counted with the layer). The interleaved schedule (torch's
    runtime schedule) waits for its sends only at the end of the step, and a pending send keeps its tensor: at the
    rank's peak every forward's output and the input gradients of the backwards done so far are alive."""
    p, t = cfg.parallel, cfg.train
    if p.pp == 1:
        return 0.0
    last = p.pp * p.virtual_stages - 1
    chunks = [(c, forwards, done) for (c, _), (forwards, done) in zip(rank_chunks(cfg, pp_rank),
                                                                        chunk_forwards_at_peak(cfg, accum, pp_rank))]
    buffers = accum * sum((c > 0) + (c < last) for c, _, _ in chunks)
    received = sum(forwards for c, forwards, _ in chunks if c > 0)
    if p.pp_schedule == "interleaved":
        outputs = accum * sum(c < last for c, _, _ in chunks)
        gradients = sum(done for c, _, done in chunks if c > 0)
    else:
        outputs, gradients = sum(forwards for c, forwards, _ in chunks if c < last), 0
    residual = t.micro_batch_size * t.seq_len * 4 * cfg.model.hidden_size / (p.tp if p.sequence_parallel else 1)
    return residual * (buffers - received + outputs + gradients)


def activation_bytes_per_token_per_layer(cfg) -> tuple[float, float]:
    """(bytes one decoder layer keeps for backward per token, bytes of one layer's full set) on this rank.

    The residual stream is fp32 (fp32 weights, bf16 autocast). Each norm keeps its fp32 input, 1/rms (fp32, one
    per token) and its fp32 normalised input (the multiplication by the norm's weight keeps it for the weight's
    gradient); the matmul after it keeps its input in the compute dtype, whole on every TP rank (under sequence
    parallelism its own sequence shard, gathered again in backward, compiled too; with recomputation the gathered
    input).
    Attention, on this rank's heads: q and k after RoPE, v, the attention output
    (the o_proj input is a view of it: the kernels write it [B, S, heads, D]) and its fp32 log-sum-exp;
    flash/memory-efficient attention keeps no seq x seq scores. SwiGLU: gate/up, silu(gate) and their product.
    tests/test_plan_memory.py measures these against the model.
    train.recompute: "full" keeps only each layer's input and rebuilds one layer's set in its backward; "selective"
    keeps the outputs of the matmuls and of attention (o_proj's and down_proj's whole: their partial sums before
    the TP reduction) and recomputes the rest.
    """
    m, p = cfg.model, cfg.parallel
    e = 2 if cfg.train.dtype == "bfloat16" else 4
    d, f, heads = m.hidden_size, m.intermediate_size, m.num_attention_heads
    kv = m.num_key_value_heads * m.head_dim
    seq_split = p.tp if p.sequence_parallel else 1
    norms = 2 * (4 * d + 4 + 4 * d) / seq_split  # whole on every TP rank unless SP
    matmul_inputs = 2 * e * d / (seq_split if cfg.train.recompute == "none" else 1)  # column_parallel_matmul.py
    attention = e * (d + 2 * kv) + e * d + 4 * heads
    full = norms + matmul_inputs + (attention + 4 * e * f) / p.tp
    layer_input = 4 * d / seq_split
    matmul_outputs = (e * (d + 2 * kv) + e * d + 4 * heads + 2 * e * f) / p.tp + 2 * e * d
    kept = {"full": layer_input, "selective": layer_input + matmul_outputs}.get(cfg.train.recompute, full)
    return kept, full


def final_norm_bytes_per_token(cfg) -> float:
    """What the last stage's final norm keeps (its fp32 input, 1/rms and normalised input: split over TP only with
    sequence parallelism) and the head's input: for the fused loss the fp32 norm output (alive while it runs; under
    sequence parallelism its shard and the gathered whole in the compute dtype), or for the plain head its input in
    the compute dtype (under sequence parallelism its shard)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    d = m.hidden_size
    seq_split = p.tp if p.sequence_parallel else 1
    if t.loss_chunk_size > 0:
        head_input = 4 / seq_split + ((2 if t.dtype == "bfloat16" else 4) if p.sequence_parallel else 0)
    else:
        head_input = (4 if t.dtype != "bfloat16" else 2) / seq_split
    return (8 * d + 4) / seq_split + head_input * d


def loss_bytes(cfg, tokens: int) -> float:
    """Peak bytes of the head + loss of one micro-batch on the last stage."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    v, d = m.vocab_size / p.tp, m.hidden_size
    bf16 = 2 if t.dtype == "bfloat16" else 0
    if t.loss_chunk_size > 0:
        # fused head + loss: one chunk of fp32 logits (a vocabulary slice) and their gradient in the compute dtype
        # (under fp32 the same buffer), the chunk's input or its dX, and the fp32 dW and the dX (in the compute dtype)
        # made in the forward and kept for the backward
        chunk = min(t.loss_chunk_size, tokens)
        return chunk * (v * (4 + bf16) + d * (4 - bf16)) + 4 * v * d + tokens * d * (4 - bf16)
    # logits in the compute dtype, their fp32 copy and the fp32 log-softmax (under TP the softmax) kept for backward
    return tokens * v * (bf16 + 4 + 4)


def bf16_copy_bytes(cfg, layers: int, in_flight_layers: float, head_copies: int) -> float:
    """Autocast's bf16 weight copies: a forward casts the weights of each decoder layer it runs, and the casts live
    until its backward (`in_flight_layers`: layers times the forwards in flight of their chunk); with
    train.bf16_weight_cache the decoder layers' copies exist once; with train.recompute they are not kept (remade in
    the backward, one layer's at a time). The head is cast per use: `head_copies` on the last stage (the plain
    loss's live until its backward; the fused loss's only while it runs). The embedding's lookup and the norms read
    their fp32 weights: no copy. tests/test_plan_memory.py and test_plan_memory_parallel.py measure them."""
    m, t = cfg.model, cfg.train
    per_layer = layer_linear_params(cfg)
    if t.bf16_weight_cache:
        decoder = layers
    elif t.recompute != "none":
        decoder = 1
    else:
        decoder = in_flight_layers
    return 2 * (per_layer * decoder + m.vocab_size * m.hidden_size / cfg.parallel.tp * head_copies)


def layer_linear_params(cfg) -> float:
    """Parameters of one decoder layer's linears on one TP rank (QKV, output, gate/up, down)."""
    m = cfg.model
    d, kv = m.hidden_size, m.num_key_value_heads * m.head_dim
    return (d * (d + 2 * kv) + d * d + 3 * d * m.intermediate_size) / cfg.parallel.tp


def loss_kept_bytes(cfg, tokens: int) -> float:
    """What the head + loss of one micro-batch on the last pipeline stage keeps until its backward, once it has run:
    the fp32 log-softmax (under TP the softmax of the vocabulary slice) and the logits, the chunk's output, which the
    stage keeps for the backward; the fused loss's fp32 dW and its dX in the compute dtype (its input, the final
    norm's output, is counted with the norm). AFAB's last stage holds this per micro-batch."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    v, d = m.vocab_size / p.tp, m.hidden_size
    if t.loss_chunk_size > 0:
        return 4 * v * d + (2 if t.dtype == "bfloat16" else 4) * tokens * d
    return tokens * v * (4 + (2 if t.dtype == "bfloat16" else 4))


def stage_memory(cfg, dp: int, accum: int, pp_rank: int) -> dict[str, float]:
    """Bytes per GPU of pipeline rank `pp_rank` by kind (tools/plan.py's docstring), with its parameters and the
    micro-batches it holds in flight."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    d, v = m.hidden_size, m.vocab_size
    first, last = pp_rank == 0, pp_rank == p.pp - 1
    chunks = rank_chunks(cfg, pp_rank)
    layers = sum(n for _, n in chunks)
    layer_params = layers * (layer_linear_params(cfg) + 2 * d)
    embedding = v * d / p.tp
    tokens = t.micro_batch_size * t.seq_len
    act_kept, act_full = activation_bytes_per_token_per_layer(cfg)
    params = layer_params
    if first:
        params += embedding
    if last:
        params += d + (embedding if (not m.tie_word_embeddings or not first) else 0)
    held = in_flight_microbatches(cfg, accum, pp_rank)
    in_flight_layers = sum(n * forwards for (_, n), (forwards, _) in zip(chunks, chunk_forwards_at_peak(cfg, accum,
                                                                                                      pp_rank)))
    acts = in_flight_layers * tokens * act_kept + tokens * (act_full - act_kept) \
        + pipeline_buffer_bytes(cfg, accum, pp_rank)
    losses = 0  # the last chunk's forwards in flight
    if last:
        losses = accum if p.pp > 1 and p.pp_schedule == "afab" else 1
        acts += losses * tokens * final_norm_bytes_per_token(cfg) + (losses - 1) * loss_kept_bytes(cfg, tokens) \
            + loss_bytes(cfg, tokens)
    head_copies = min(losses, 1) if t.loss_chunk_size > 0 else losses
    parts = {
        "weights_fp32": 4 * params,
        "weights_bf16_copies": bf16_copy_bytes(cfg, layers, in_flight_layers, head_copies)
        if t.dtype == "bfloat16" else 0.0,
        "grads_fp32": 4 * params,
        "optimizer_adamw": 8 * params / (dp if p.zero_stage == 1 else 1),
        "activations": acts,
    }
    parts["total"] = sum(parts.values())
    return {"params": params, "held": held, **parts}


def memory_plan(cfg, dp: int, accum: int) -> dict[str, Any]:
    """The memory of the most loaded pipeline rank."""
    pp = cfg.parallel.pp
    ranks = [stage_memory(cfg, dp, accum, r) for r in range(pp)]
    rank = max(range(pp), key=lambda r: ranks[r]["total"])
    worst = ranks[rank]
    held = worst.pop("held")  # the micro-batches in flight on the stage reported, not always the first's
    stage = "first" if rank == 0 else "last" if rank == pp - 1 else f"rank {rank} of {pp}"
    return {"stage": stage, "pp_rank": rank, "in_flight_microbatches": held,
            "params_per_gpu": worst.pop("params"), "bytes": worst, "gib": {k: b / GIB for k, b in worst.items()}}
