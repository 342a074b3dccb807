"""`parallelize(model, ctx, cfg)`: turn the plain Llama into this rank's tensor/sequence/pipeline-parallel part.

What a rank gets (a `ParallelModel`, an nn.Module):
- only the decoder layers of its pipeline chunks (`pipeline_chunks`: balanced, counting embedding and head), the
  embedding on the first stage, the final norm and head on the last; parameter names are the plain model's
  (`layers.3.self_attn.qkv_proj.weight`), a stage simply lacks what it does not own. With tied embeddings and
  pp > 1 the last stage also keeps `embed_tokens` (its weight is the head's): both ends hold the same logical
  tensor under the same name, sum its gradient over `ctx.embedding_group`, and checkpoints see one tensor.
- tensor-parallel layers (`tensor_parallel`): QKV and gate/up column-parallel, o/down row-parallel, vocab-parallel
  embedding and head. Every parameter carries `tp_shard_dim` (0, 1, or None when replicated over TP).
- sequence parallelism (tp > 1): the residual stream and the norms hold seq_len/tp tokens; the first projection
  of the attention and of the MLP all-gathers its input over the sequence (keeping only the shard for backward,
  `column_parallel_matmul`) and the row-parallel projection reduce-scatters their outputs. Replicated
  parameters then see only their rank's tokens: they are tagged `sequence_parallel = True` and their gradients
  summed over TP before the data-parallel reduction.
- `chunks`: one `ModelChunk` per virtual pipeline stage held by this rank (not registered as children, so names
  stay unique), the units that the pipeline schedule runs.
- `grads`: the data-parallel gradient buckets (`data_parallel.GradBuffers`), hooked into backward.

Every rank first builds the whole plain model from the same seed, so in every layout the logical weights are those
of the single-process run; `parallelize` then keeps only its shards.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from nanotronix.config import Config
from nanotronix.model.documents import Documents
from nanotronix.model.llama import DecoderLayer, Llama, decoder_forward
from nanotronix.parallel.compute_weights import decoder_linears
from nanotronix.parallel.context import ParallelContext
from nanotronix.parallel.data_parallel import GradBuffers
from nanotronix.parallel.pipeline import MicroBatchRunner
from nanotronix.parallel.partition import chunk_ids_of_rank, pipeline_chunks
from nanotronix.parallel.speedups import apply_speedups
from nanotronix.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, shard

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": None}


class DecoderParts(nn.Module):
    """The parts of the plain decoder that a rank or a pipeline chunk holds, under the plain model's names (what
    `model.llama.decoder_forward` runs); `embed_tokens`, `norm` and `lm_head` may be None, `layers` a slice."""

    def __init__(self, config, embed_tokens: Optional[nn.Module], layers: dict[str, DecoderLayer],
                 norm: Optional[nn.Module], lm_head: Optional[nn.Module]):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleDict(layers)
        self.norm = norm
        self.lm_head = lm_head


class ModelChunk(DecoderParts):
    """The layers one (virtual) pipeline stage runs: token ids or hidden states in, hidden states or local logits out.

    Under sequence parallelism the hidden states are [B, S/tp, D]; RoPE is computed for the whole sequence because
    the attention sees it whole. Weights are fp32; `compute_dtype` bfloat16 runs the forward under autocast (the
    backward follows the forward's dtypes), which is the trainer's mixed precision.
    """

    def __init__(self, config, embed_tokens: Optional[nn.Module], layers: dict[str, DecoderLayer],
                 norm: Optional[nn.Module], lm_head: Optional[nn.Module], seq_shards: int,
                 compute_dtype: Optional[torch.dtype]):
        super().__init__(config, embed_tokens, layers, norm, lm_head)
        self.seq_shards = seq_shards
        self.compute_dtype = compute_dtype
        # > 0 (set by speedups.apply_fused_loss): the last chunk returns the final norm's output and the loss
        # applies the head in chunks of this many tokens (parallel.cross_entropy.head_and_loss).
        self.fused_loss_chunk = 0
        # set by speedups.apply_compile: the fused loss runs its chunks through torch.compile with these options
        self.loss_compile: Optional[dict] = None

    def forward(self, x: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Returns this stage's output. Under document masking a stage after the first finds the documents in the
        micro-batch's token ids `tokens` [B, S] (every pipeline rank holds the batch; the schedule hands them to
        every stage as a keyword argument), rather than receive them from the stage before: torch 2.11's
        PipelineStage wants a gradient for every tensor it receives."""
        autocast = (torch.autocast(device_type=x.device.type, dtype=self.compute_dtype)
                    if self.compute_dtype is not None else contextlib.nullcontext())
        eos = self.config.document_mask_eos_id
        documents = (Documents.from_tokens(tokens, eos) if tokens is not None and eos is not None
                     and self.embed_tokens is None else None)
        with autocast:
            return decoder_forward(self, x, skip_head=bool(self.fused_loss_chunk), documents=documents,
                                   seq_shards=self.seq_shards)


class ParallelModel(DecoderParts):
    """This rank's part of the model, under the plain model's parameter names (see the module docstring)."""

    def __init__(self, config, ctx: ParallelContext, cfg: Config, embed_tokens: Optional[nn.Module],
                 layers: dict[str, DecoderLayer], norm: Optional[nn.Module], lm_head: Optional[nn.Module]):
        super().__init__(config, embed_tokens, layers, norm, lm_head)
        self.ctx = ctx
        self.parallel_cfg = cfg.parallel
        self.chunks: list[ModelChunk] = []
        self.chunk_ids: list[int] = []
        self.num_chunks = 0
        self.grads: Optional[GradBuffers] = None
        self.runner: Optional[MicroBatchRunner] = None

    @property
    def tp_group(self):
        return self.ctx.tp_group if self.ctx.tp > 1 else None

    @property
    def has_first_chunk(self) -> bool:
        return 0 in self.chunk_ids

    @property
    def has_last_chunk(self) -> bool:
        return self.num_chunks - 1 in self.chunk_ids

    def describe(self) -> str:
        """One line for the start-up log, e.g. 'tp=2 (sequence parallel) x pp=2 (1f1b) x dp=2 (ZeRO-1)'."""
        p, ctx = self.parallel_cfg, self.ctx
        tp = f"tp={ctx.tp}" + (" (sequence parallel)" if p.sequence_parallel and ctx.tp > 1 else "")
        pp = f"pp={ctx.pp}"
        if ctx.pp > 1:
            pp += f" ({p.pp_schedule}" + (f", {p.virtual_stages} virtual stages" if p.virtual_stages > 1 else "") + ")"
        notes = [n for n, on in (("ZeRO-1", p.zero_stage == 1), ("bf16 gradient reduction",
                                                             p.grad_reduce_dtype == "bfloat16")) if on]
        dp = f"dp={ctx.dp}" + (f" ({', '.join(notes)})" if notes and ctx.dp > 1 else "")
        return f"{tp} x {pp} x {dp}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids -> logits (this rank's vocabulary slice under TP); with train.loss_chunk_size, the final norm's
        output instead (the fused loss applies the head itself, chunk by chunk: parallel.cross_entropy.head_and_loss).
        Only without pipeline parallelism. Outside a training step it first makes every weight current in fp32
        (ZeRO-1: collective, so every rank calls it)."""
        if self.ctx.pp > 1:
            raise RuntimeError("a pipeline-parallel model runs through nanotronix.train.step.train_step, "
                               "not model(x)")
        if not self.grads.in_step:
            self.grads.wait_for_weights()
        return self.chunks[0](x)


def _tensor_parallel_layer(layer: DecoderLayer, group, sequence_parallel: bool, recompute: bool) -> None:
    """Under sequence parallelism the qkv and gate/up linears gather their input themselves; with activation
    recomputation they keep it gathered (the recomputed forward gathers it anyway)."""
    attn, mlp = layer.self_attn, layer.mlp
    in_mode = "gather_sequence" if sequence_parallel else "copy"
    out_mode = "reduce_scatter_sequence" if sequence_parallel else "reduce"
    attn.qkv_proj = ColumnParallelLinear.from_dense(attn.qkv_proj.weight, group, in_mode, recompute)
    attn.o_proj = RowParallelLinear.from_dense(attn.o_proj.weight, group, out_mode)
    mlp.gate_up_proj = ColumnParallelLinear.from_dense(mlp.gate_up_proj.weight, group, in_mode, recompute)
    mlp.down_proj = RowParallelLinear.from_dense(mlp.down_proj.weight, group, out_mode)


def weight_readers(chunks: list[ModelChunk]) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(module, the weights its forward reads) for every part of the chunks, in forward order: the embedding,
    each decoder layer, and the final norm together with the head (the last chunk holds both; the head runs right
    after the norm, and the fused loss reads the head's weight without calling the head module)."""
    parts = []
    for chunk in chunks:
        if chunk.embed_tokens is not None:
            parts.append((chunk.embed_tokens, list(chunk.embed_tokens.parameters())))
        parts += [(layer, list(layer.parameters())) for layer in chunk.layers.values()]
        if chunk.norm is not None:
            head = list(chunk.lm_head.parameters()) if chunk.lm_head is not None else []
            parts.append((chunk.norm, list(chunk.norm.parameters()) + head))
    return parts


def parallelize(model: Llama, ctx: ParallelContext, cfg: Config) -> ParallelModel:
    """Apply TP (+SP) and PP to the plain `model` for this rank and hook up data-parallel gradient reduction."""
    p, m = cfg.parallel, cfg.model
    group = ctx.tp_group if ctx.tp > 1 else None
    sequence_parallel = p.sequence_parallel and ctx.tp > 1
    tied = m.tie_word_embeddings
    num_chunks = ctx.pp * p.virtual_stages
    layer_plan = pipeline_chunks(m, cfg.train.seq_len, ctx.pp, p.virtual_stages)
    chunk_ids = chunk_ids_of_rank(ctx.pp_rank, ctx.pp, p.virtual_stages)
    first, last = 0 in chunk_ids, num_chunks - 1 in chunk_ids

    layers: dict[str, DecoderLayer] = {}
    for cid in chunk_ids:
        for i in layer_plan[cid]:
            layer = model.layers[str(i)]
            _tensor_parallel_layer(layer, group, sequence_parallel, cfg.train.recompute != "none")
            layers[str(i)] = layer

    embed = None
    if first or (last and tied):
        embed = VocabParallelEmbedding.from_dense(model.embed_tokens.weight, group, sequence_parallel)
    norm = lm_head = None
    if last:
        norm = model.norm
        head_weight = embed.weight if tied else shard(model.lm_head.weight, 0, group)
        lm_head = ColumnParallelLinear(head_weight, group, "gather_sequence" if sequence_parallel else "copy")

    pm = ParallelModel(m, ctx, cfg, embed, layers, norm, lm_head)
    for param in pm.parameters():
        if not hasattr(param, "tp_shard_dim"):
            param.tp_shard_dim = None
        param.sequence_parallel = sequence_parallel and param.tp_shard_dim is None
        # Both pipeline ends hold the tied embedding: its gradient is summed over ctx.embedding_group.
        param.tied_across_stages = tied and ctx.pp > 1 and embed is not None and param is embed.weight

    compute_dtype = COMPUTE_DTYPES[cfg.train.dtype]
    seq_shards = ctx.tp if sequence_parallel else 1
    for cid in chunk_ids:
        pm.chunks.append(ModelChunk(
            m, embed if cid == 0 else None, {str(i): layers[str(i)] for i in layer_plan[cid]},
            norm if cid == num_chunks - 1 else None, lm_head if cid == num_chunks - 1 else None,
            seq_shards, compute_dtype))
    pm.chunk_ids = chunk_ids
    pm.num_chunks = num_chunks
    # ZeRO-1: the decoder linears fill buckets of their own, which the bf16 weight cache gathers in bf16 into its
    # copies; the same layout without the cache, so that its steps stay bit-identical (the gradient norm sums
    # per-bucket shard pieces)
    apart = [m.weight for m in decoder_linears(pm)] if p.zero_stage == 1 and ctx.dp > 1 else []
    pm.grads = GradBuffers(pm, ctx, zero_stage=p.zero_stage, bucket_size=p.grad_bucket_size,
                           reduce_dtype=getattr(torch, p.grad_reduce_dtype), own_buckets=apart)
    if p.overlap_param_gather and p.zero_stage == 1 and ctx.dp > 1:
        pm.grads.install_weight_hooks(weight_readers(pm.chunks))
    pm.runner = MicroBatchRunner(pm, next(pm.parameters()).device)
    apply_speedups(pm, cfg.train)
    return pm
