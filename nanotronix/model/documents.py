"""Document masking of packed windows (`model.document_mask_eos_id`).

A training window packs several documents, each ended by the stores' EOS token. By default attention is causal over
the whole window, as SmolLM2 trained. With document masking a token attends only to earlier tokens of its own
document and RoPE positions restart at 0 with every document (what Megatron calls reset_attention_mask plus
reset_position_ids), so each document is computed exactly as if it stood alone.

`Documents` is built once per forward from the token ids and handed to every layer; each attention backend asks it
for the form it needs (a boolean mask for SDPA and the eager path, `cu_seqlens` for FlashAttention-2's varlen
kernel, a block mask for FlexAttention), built once before the layers (`prepare`, so that a compiled layer receives
it as an input instead of building it inside its graph) and shared by all layers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class Documents:
    ids: torch.Tensor  # [B, S] int64: index of each token's document within its row (0, 1, ...)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, eos_id: int) -> "Documents":
        """An EOS token belongs to the document it ends; the next token starts a new one."""
        is_eos = (tokens == eos_id).long()
        return cls(torch.cumsum(is_eos, dim=1) - is_eos)

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """[B, S] position of each token within its document."""
        index = torch.arange(self.ids.shape[1], device=self.ids.device).expand_as(self.ids)
        starts = torch.ones_like(self.ids, dtype=torch.bool)
        starts[:, 1:] = self.ids[:, 1:] != self.ids[:, :-1]
        return index - torch.where(starts, index, 0).cummax(dim=1).values

    @functools.cached_property
    def attention_mask(self) -> torch.Tensor:
        """[B, 1, S, S] boolean, True where query i may attend key j: same document and j <= i."""
        s = self.ids.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=self.ids.device).tril()
        return ((self.ids[:, :, None] == self.ids[:, None, :]) & causal)[:, None]

    @functools.cached_property
    def lengths(self) -> torch.Tensor:
        """[documents] token count of every document, row by row (documents never span two rows)."""
        row_offset = torch.cumsum(self.ids[:, -1] + 1, dim=0) - (self.ids[:, -1] + 1)
        return torch.bincount((self.ids + row_offset[:, None]).flatten())

    @functools.cached_property
    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """(int32 [documents + 1] start offsets of the documents in the flattened [B * S] tokens, longest
        document), FlashAttention-2's varlen arguments."""
        lengths = self.lengths
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=self.ids.device)
        cu[1:] = torch.cumsum(lengths, dim=0)
        return cu, int(lengths.max())

    @functools.cached_property
    def block_mask(self):
        """FlexAttention's BlockMask of the same rule (same document, causal). Blocks of 128 x 128 tokens that lie
        wholly across two documents are skipped by the kernel, not computed and then masked."""
        from torch.nn.attention.flex_attention import create_block_mask
        b, s = self.ids.shape
        return create_block_mask(_same_document_causal(self.ids), b, None, s, s, device=self.ids.device)

    def prepare(self, attention_backend: str) -> "Documents":
        """Build now the form `attention_backend` reads (see the module docstring)."""
        getattr(self, _FORM_OF_BACKEND[attention_backend])
        return self


_FORM_OF_BACKEND = {"sdpa": "attention_mask", "sdpa_cudnn": "attention_mask", "eager": "attention_mask",
                    "flash_attention_2": "cu_seqlens", "flex": "block_mask"}


def _same_document_causal(ids: torch.Tensor):
    """FlexAttention's mask_mod: query q may see key k of row b when both are in the same document and k <= q. One
    code object for every batch (only the captured ids differ), so compiled layers do not recompile per batch."""
    def mask_mod(b, h, q, k):
        return (ids[b, q] == ids[b, k]) & (k <= q)
    return mask_mod
