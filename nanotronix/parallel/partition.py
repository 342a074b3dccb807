"""Split the decoder layers into pipeline chunks of balanced compute, counting the embedding and the head.

The cost of a block is its forward+backward FLOPs per token, counted as in `nanotronix.train.flops`:
  decoder layer   6 * (its matmul parameters) + 6 * seq_len * heads * head_dim   (causal attention)
  output head     6 * hidden * vocab    (a real GEMM, tied or not; plus the final norm, negligible)
  embedding       2 * hidden            (a row lookup and its scatter-add gradient: no matmul)
The head matters: for SmolLM2-135M it weighs as much as ~8 decoder layers, for 1.7B ~1.5. The embedding is
counted for completeness and is tiny in FLOPs (it weighs like the head in memory, which is not what limits a
pipeline's throughput).

Chunks are contiguous, each holds at least one layer, the first also holds the embedding and the last the head;
among all such splits we take one that minimises the most expensive chunk (exact dynamic programme, O(C*L^2)).
Ties are broken from the last cut back, so every rank computes the same plan: the earliest last cut, then, for the
chunks before it, a split that minimises their own most expensive chunk, with the earliest cut among those, and so
on. The chunks before an expensive one stay balanced among themselves instead of being cut as early as possible
(8 layers in 3 chunks, the head costing 10 layers: [0-2] [3-6] [7], not [0] [1-6] [7]). Chunk c runs on pipeline rank
c % pp (virtual stage c // pp), the order of interleaved 1F1B (Narayanan et al. 2021, and
`torch.distributed.pipelining`'s "loop" placement).
"""
from __future__ import annotations

from nanotronix.config import ModelConfig


def block_costs(cfg: ModelConfig, seq_len: int) -> tuple[float, float, float]:
    """(embedding, one decoder layer, head) cost in forward+backward FLOPs per token."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    layer_params = d * (d + 2 * kv) + d * d + 3 * d * f
    layer = 6.0 * layer_params + 6.0 * seq_len * cfg.num_attention_heads * cfg.head_dim
    return 2.0 * d, layer, 6.0 * d * cfg.vocab_size


def partition_layers(num_layers: int, num_chunks: int, layer_cost: float = 1.0, embedding_cost: float = 0.0,
                     head_cost: float = 0.0) -> list[list[int]]:
    """Contiguous layer ids per chunk minimising the largest chunk cost (ties: earliest cuts)."""
    if num_chunks < 1 or num_layers < num_chunks:
        raise ValueError(f"cannot split {num_layers} layers into {num_chunks} pipeline chunks of at least one layer")

    def cost(first: int, end: int, chunk: int) -> float:
        c = (end - first) * layer_cost
        if chunk == 0:
            c += embedding_cost
        if chunk == num_chunks - 1:
            c += head_cost
        return c

    inf = float("inf")
    # best[c][i]: smallest achievable max cost when chunks 0..c-1 hold layers [0, i).
    best = [[inf] * (num_layers + 1) for _ in range(num_chunks + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_chunks + 1)]
    best[0][0] = 0.0
    for c in range(1, num_chunks + 1):
        for i in range(c, num_layers - (num_chunks - c) + 1):
            for j in range(c - 1, i):  # chunk c-1 holds [j, i); ascending j keeps the earliest cut on ties
                value = max(best[c - 1][j], cost(j, i, c - 1))
                if value < best[c][i] - 1e-9 * max(1.0, abs(value)):
                    best[c][i], cut[c][i] = value, j
    bounds = [num_layers]
    for c in range(num_chunks, 0, -1):
        bounds.append(cut[c][bounds[-1]])
    bounds.reverse()
    return [list(range(bounds[c], bounds[c + 1])) for c in range(num_chunks)]


def pipeline_chunks(cfg: ModelConfig, seq_len: int, pp: int, virtual_stages: int) -> list[list[int]]:
    """Layer ids of every chunk (pp * virtual_stages of them) for this model and sequence length."""
    embedding, layer, head = block_costs(cfg, seq_len)
    return partition_layers(cfg.num_hidden_layers, pp * virtual_stages, layer, embedding, head)


def chunk_ids_of_rank(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Global chunk (= pipeline stage) indices that pipeline rank `pp_rank` runs, in model order."""
    return [v * pp + pp_rank for v in range(virtual_stages)]
