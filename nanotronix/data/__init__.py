"""Token stores, preprocessing and the trainer's deterministic data loader.

Public API:
    open_store(path_or_prefix) -> TokenStore      Megatron .bin/.idx, datatrove .ds, zarr (format detected)
    require_integer_tokens(store, name) -> store   refuses a store of float values (the trainer and evaluate do)
    first_outside_vocabulary(tokens, vocab) -> int | None   the first id outside [0, vocab), negative ones too
    tokenizer_note(stores) -> str | None           a warning when stores name different tokenizer files
    multimodal_note(stores) -> str | None          a note naming megatron-core multimodal stores (modes ignored)
    document_eos_mismatch(stores, eos_id) -> str | None   model.document_mask_eos_id against the stores' EOS
    load_tokenizer(spec) -> (tokenizers.Tokenizer, TokenizerInfo)
    build_train_loader(cfg, dp_rank, dp_size, consumed_samples=0) -> TrainLoader
    build_prefetched_loader(cfg, dp_rank, dp_size, device, ...) -> PrefetchingLoader   the trainer's feed:
                                                   data.loader (pytorch | dali), next batch read ahead, pinned
    preprocess(PreprocessOptions) -> PreprocessResult   (what tools/preprocess.py runs)
    DataError                                      every user-facing data problem (one line)

`build_train_loader`/`TrainLoader` import torch; they are loaded lazily so that preprocessing and inspecting
stores never pay for it.
"""
from .errors import DataError
from .store import (TokenStore, document_eos_mismatch, first_outside_vocabulary, multimodal_note, open_store,
                    require_integer_tokens, tokenizer_note)
from .tokenizer import TokenizerInfo, load_tokenizer

_LAZY = {
    "build_train_loader": ".loader",
    "TrainLoader": ".loader",
    "build_prefetched_loader": ".prefetch",
    "PrefetchingLoader": ".prefetch",
    "preprocess": ".pipeline",
    "PreprocessOptions": ".pipeline",
    "PreprocessResult": ".pipeline",
}

__all__ = ["DataError", "TokenStore", "document_eos_mismatch", "first_outside_vocabulary", "multimodal_note",
           "open_store", "require_integer_tokens", "tokenizer_note", "TokenizerInfo", "load_tokenizer", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
