"""Typed run configuration: YAML -> dataclasses, presets, dotted overrides, strict validation.

A config is read in three steps (the generic ones in nanotronix/config_tree.py): the YAML file becomes a nested
dict, dotted command-line overrides (`train.train_steps=20 parallel.tp=2`) are applied to that dict, and the dict
is turned into the dataclasses below; then presets fill what was left out and `validate` checks the whole. Every
step rejects what it does not understand with a `ConfigError` whose message names the offending field, so a
command can print it as one line and exit non-zero.

Steps are counted from 1: step s is the s-th optimizer update. A data stage with `start_step: s`
feeds steps s, s+1, ... until the next stage starts.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from nanotronix.config_tree import apply_override, build_dataclass, read_yaml_tree
from nanotronix.errors import ConfigError


# torch.compile modes for train.compile_mode ("default" passes no mode); none with CUDA graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

# parallel.collective_timeout_minutes' ceiling (~2 years): torch's stores take the timeout in milliseconds as a 64-bit
# integer, and infinity has no timedelta at all.
MAX_COLLECTIVE_TIMEOUT_MINUTES = 1e6

# Published SmolLM2 architectures (HF config.json of HuggingFaceTB/SmolLM2-*; init std from the nanotron
# pretraining configs in huggingface/smollm). Pretraining used rope_theta 10000 at 2048 tokens; the released
# HF configs carry the context-extended values (8192 positions, theta 1e5 / 1.3e5).
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         init_std=0.041666666666666664),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, max_position_embeddings=2048,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, init_std=0.03227,
                         initializer_range=0.02),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, max_position_embeddings=2048,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, init_std=0.02),
}


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rope_theta: Optional[float] = None
    rms_norm_eps: Optional[float] = None
    tie_word_embeddings: Optional[bool] = None
    init_std: Optional[float] = None
    # What an exported config.json says as `initializer_range` (transformers uses it only to initialise weights a
    # checkpoint lacks); None: init_std. SmolLM2-360M trained with init std 0.03227 but its release says 0.02.
    initializer_range: Optional[float] = None
    # auto: flash_attention_2 when flash-attn is installed and the run is on CUDA, else sdpa.
    attn_implementation: str = "auto"
    # None: causal attention over the whole packed window (how SmolLM2 trained). A token id (the stores' EOS):
    # document masking, each token attends within its own document and RoPE positions restart after every EOS
    # (nanotronix/model/documents.py).
    document_mask_eos_id: Optional[int] = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Parameter count of the plain model (tied embeddings counted once)."""
        d, f, v, layers = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + layers * per_layer + d + head


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None  # derived from world size / (tp * pp) when left out
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1  # model chunks per pipeline rank; > 1 only with pp_schedule: interleaved
    sequence_parallel: bool = False
    zero_stage: int = 0
    # Gradient elements per data-parallel reduction bucket (fp32): each bucket's all-reduce / reduce-scatter starts
    # as soon as its gradients are complete, overlapping the rest of the backward pass (Megatron's default size).
    grad_bucket_size: int = 40_000_000
    # ZeRO-1: the all-gather of the updated weights runs in the background and each layer waits for its own weights
    # when the next step first runs it, so later layers' gathers overlap earlier layers' forward (bit-identical).
    overlap_param_gather: bool = True
    # dtype the data-parallel reduction moves: float32 (the sum of fp32 gradients), or bfloat16 (each rank's summed
    # micro-batch gradients rounded to bf16 and summed in bf16 over DP: half the traffic, which sets the pace of
    # multi-node runs at few sequences per GPU; tools/plan.py weighs it; torch DDP's bf16_compress_hook)
    grad_reduce_dtype: str = "float32"
    # How long a collective may wait for the other ranks before the process group aborts the run (NCCL and gloo;
    # Megatron's --distributed-timeout-minutes). Raise it if a checkpoint or validation takes longer on one rank.
    collective_timeout_minutes: float = 10.0


@dataclass
class TrainConfig:
    seq_len: int = 2048
    global_batch_size: int = 8
    micro_batch_size: int = 1
    train_steps: int = 100
    seed: int = 42
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when available, else cpu
    # Speed switches (nanotronix/parallel/speedups.py); each has a CPU numerics test against the plain path.
    compile: bool = False  # torch.compile each decoder layer (Inductor fuses norm/RoPE/SwiGLU/residual adds)
    # with compile: default | max-autotune-no-cudagraphs (Inductor times its own Triton GEMMs against cuBLAS for
    # every matmul shape and may fuse the elementwise ops around a GEMM into it; minutes more of compilation)
    compile_mode: str = "default"
    recompute: str = "none"  # none | selective (save matmul/attention outputs only) | full (whole layer)
    fused_kernels: bool = False  # csrc/ CUDA kernels for add+RMSNorm, RoPE, SwiGLU (PyTorch twin elsewhere)
    loss_chunk_size: int = 0  # > 0: fused head + cross entropy over chunks of this many tokens (no full logits)
    bf16_weight_cache: bool = False  # bf16 decoder weights cast once per step, not per micro-batch (dtype bfloat16)
    grad_accumulation_fusion: bool = False  # with bf16_weight_cache: wgrad GEMMs accumulate into the fp32 buckets
    # steps not trained ("A-B" inclusive, or "N"; Megatron's --skip-train-iteration-range): their batches are passed
    # over, no update is made, the learning rate goes on by step. After a loss spike: resume from a checkpoint before
    # it with the steps around it skipped, so the run meets other data.
    skip_steps: list[str] = field(default_factory=list)
    # > 0: a step whose loss or gradient norm is more than this many standard deviations above the mean of the
    # last spike_skip_window steps' is not applied (OLMo 2: 6 over 128; nanotronix/train/spike_guard.py). 0: off.
    spike_skip_sigma: float = 0.0
    spike_skip_window: int = 128


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    weight_decay_norms: bool = False  # decay the RMSNorm gains too (SmolLM2's nanotron decayed every parameter)
    clip_grad: float = 1.0


@dataclass
class LRScheduleConfig:
    warmup_steps: int = 0
    decay_start_step: Optional[int] = None  # None: no decay (constant after warm-up)
    decay_steps: int = 0
    decay_style: str = "linear"
    min_lr: float = 0.0


@dataclass
class DatasetConfig:
    path: str = ""
    weight: float = 1.0


@dataclass
class StageConfig:
    name: str = "stage1"
    start_step: int = 1
    datasets: list[DatasetConfig] = field(default_factory=list)


@dataclass
class DataConfig:
    tokenizer: Optional[str] = None
    # Folder that relative dataset paths are resolved against, so one override (data.root=/corpus) points a
    # recipe at a corpus. None: relative paths stay relative to the working directory.
    root: Optional[str] = None
    stages: list[StageConfig] = field(default_factory=list)
    data_seed: int = 1234
    # pytorch: the loader's numpy reads; dali: the same batches through an NVIDIA DALI pipeline (optional package
    # nvidia-dali-cuda120). Either way the next step's batch is prefetched (pinned on CUDA): data/prefetch.py.
    loader: str = "pytorch"


@dataclass
class ValidationConfig:
    # Held-out token stores (relative paths are joined to data.root, like the datasets). The first num_samples
    # windows of train.seq_len tokens of each (window i = stream tokens [i*L, i*L + L + 1), as `nanotronix.evaluate`
    # reads them) are scored every `interval` steps and after the last step: `val_losses` (each store) and
    # `val_loss` (their mean) in metrics.jsonl.
    data: list[str] = field(default_factory=list)
    interval: int = 0  # 0: no validation
    num_samples: int = 0


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    interval: int = 0  # 0: only at the end of training (and on SIGTERM/SIGUSR1)
    keep_last: int = 0  # 0: keep every checkpoint
    # Milestones saved (even off the interval) and never pruned: every multiple of keep_every (0: none) and the steps
    # in keep_steps. A WSD run's decays and later phases start from such steps.
    keep_every: int = 0
    keep_steps: list[int] = field(default_factory=list)
    resume: str = "auto"  # auto | none | PATH
    async_save: bool = False  # write checkpoints in a background thread while training goes on


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    interval: int = 1
    tensorboard: bool = False  # the records as TensorBoard scalars too, in LOGGING_DIR/tensorboard
    # Weights & Biases (nanotronix/train/wandb_log.py): the records go to this W&B project too (None: off). One W&B
    # run per logging folder: a resumed or requeued job continues it. offline: written under LOGGING_DIR/wandb for
    # `wandb sync` later (compute nodes without internet).
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_name: Optional[str] = None  # the W&B run's name; None: the name of the folder holding logging.dir
    wandb_mode: str = "online"  # online | offline
    # Seconds without progress after which rank 0 reports which ranks are behind or not responding, and those print
    # their stacks (nanotronix/train/hang_report.py); below the 10-minute collective timeout. 0: off.
    hang_report_seconds: float = 300.0
    # Steps run under torch.profiler ("A-B" inclusive, or "N"; "" off) on the ranks in profile_ranks: a trace and a
    # kernel-time summary per rank in LOGGING_DIR/profile/ (nanotronix/train/profiler.py). Those steps run slower.
    profile_steps: str = ""
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    # With profile_steps on CUDA: the caching allocator's history over those steps too (for pytorch.org/memory_viz).
    memory_snapshot: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# loading and validation


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    tree = read_yaml_tree(path) if path is not None else {}
    for o in overrides or []:
        apply_override(tree, o)
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> Config:
    cfg = build_dataclass(Config, tree)
    resolve_preset(cfg.model)
    resolve_dataset_paths(cfg.data, cfg.validation)
    for section in (cfg.checkpoint, cfg.logging):  # `~` once, here: every user of the folder sees the same path
        section.dir = os.path.expanduser(section.dir) if section.dir else section.dir
    validate(cfg)
    return cfg


def resolve_dataset_paths(data: DataConfig, validation: ValidationConfig) -> None:
    """Join relative dataset paths (and validation.data) to data.root, made absolute first so that a dumped config
    reloads unchanged. A data.tokenizer that names a local file or folder relative to where the run starts is made
    absolute too (checkpoints keep the config: the export reads the tokenizer from any folder); a Hub id stays."""
    if data.tokenizer and not os.path.isabs(os.path.expanduser(data.tokenizer)) \
            and os.path.exists(os.path.expanduser(data.tokenizer)):
        data.tokenizer = os.path.abspath(os.path.expanduser(data.tokenizer))
    if data.root is None:
        return
    root_is_url = "://" in data.root  # an fsspec URL (zarr stores): join as a string
    if not root_is_url:
        data.root = os.path.abspath(os.path.expanduser(data.root))

    def joined(path: str) -> str:
        if not path or "://" in path or os.path.isabs(os.path.expanduser(path)):
            return path
        return data.root.rstrip("/") + "/" + path if root_is_url else os.path.join(data.root, path)

    for stage in data.stages:
        for ds in stage.datasets:
            ds.path = joined(ds.path)
    validation.data = [joined(path) for path in validation.data]


def resolve_preset(model: ModelConfig) -> None:
    """Fill fields left out with the preset's values; fields given explicitly win (e.g. fewer layers)."""
    if model.preset is None:
        return
    if model.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {model.preset!r} (known: {', '.join(PRESETS)})")
    for key, value in PRESETS[model.preset].items():
        if getattr(model, key) is None:
            setattr(model, key, value)


def preset_note(model: ModelConfig) -> Optional[str]:
    """What a run of a named preset says when explicit fields changed it (fewer layers for a test, a longer context;
    or a copied config whose fields all win, so that the preset names a model that is not the one trained)."""
    if model.preset is None:
        return None
    changed = [f"{key}={getattr(model, key)} (the preset's {value})" for key, value in PRESETS[model.preset].items()
               if getattr(model, key) != value]
    if not changed:
        return None
    return f"model.preset {model.preset}, with explicit fields that win over it: {', '.join(changed)}"


def config_notes(cfg: Config) -> list[str]:
    """What a run says at its start about settings that are valid but likely not what was meant."""
    notes = [preset_note(cfg.model)]
    if not cfg.checkpoint.dir:
        notes.append("checkpoint.dir is not set: no checkpoint will be saved")
    if cfg.parallel.sequence_parallel and cfg.parallel.tp == 1:  # an error would break a tp>1 recipe reused at tp=1
        notes.append("parallel.sequence_parallel is set but parallel.tp is 1: it splits activations among the "
                     "tensor-parallel ranks, so with one it does nothing")
    if cfg.validation.data and cfg.validation.interval == 0:
        notes.append("validation.data is set but validation.interval is 0: it is not scored (set an interval)")
    for i, stage in enumerate(cfg.data.stages):  # a mixture's shares: a typo in one would shift all the others
        total = sum(ds.weight for ds in stage.datasets)
        if len(stage.datasets) > 1 and abs(total - 1) > 1e-6:
            notes.append(f"data.stages.{i} ({stage.name}): its weights sum to {total:.6g}, not 1: each dataset gets "
                         f"its weight / {total:.6g} of the stage's samples (only their ratios count)")
    steps = cfg.train.train_steps
    unreached = [f"{st.name} (from step {st.start_step})" for st in cfg.data.stages if st.start_step > steps]
    if unreached:
        notes.append(f"data stages that start after the last step {steps} are never trained: {', '.join(unreached)}")
    return [note for note in notes if note]


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    validate_model(cfg.model)
    _validate_run(cfg)


def validate_model(m: ModelConfig) -> None:
    """The model section's own checks (also run on a Hugging Face config.json by convert_from_hf)."""
    optional = ("preset", "document_mask_eos_id", "initializer_range")
    missing = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in optional and getattr(m, f.name) is None]
    _require(not missing, f"model.{', model.'.join(missing)}: missing (set {'it' if len(missing) == 1 else 'them'} "
                          f"or use model.preset, e.g. smollm2-135m)")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        _require(getattr(m, name) > 0, f"model.{name}: must be positive, got {getattr(m, name)}")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size: {m.hidden_size} is not divisible by model.num_attention_heads="
             f"{m.num_attention_heads}")
    _require(m.num_attention_heads % m.num_key_value_heads == 0,
             f"model.num_attention_heads: {m.num_attention_heads} is not a multiple of "
             f"model.num_key_value_heads={m.num_key_value_heads}")
    _require(m.head_dim % 2 == 0, f"model.hidden_size: head dim {m.head_dim} must be even for RoPE")
    _require(m.rope_theta > 0, "model.rope_theta: must be positive")
    _require(m.rms_norm_eps > 0, "model.rms_norm_eps: must be positive")
    _require(m.init_std > 0, "model.init_std: must be positive")
    _require(m.initializer_range is None or m.initializer_range > 0, "model.initializer_range: must be positive")
    _require(m.attn_implementation in ("auto", "sdpa", "sdpa_cudnn", "flash_attention_2", "flex", "eager"),
             f"model.attn_implementation: {m.attn_implementation!r} is not "
             "auto|sdpa|sdpa_cudnn|flash_attention_2|flex|eager")


def _validate_run(cfg: Config) -> None:
    """Everything but the model section's own checks: the layout, training, data and their fit to the model."""
    m = cfg.model
    p = cfg.parallel
    for name in ("tp", "pp", "virtual_stages", "grad_bucket_size"):
        _require(getattr(p, name) >= 1, f"parallel.{name}: must be >= 1, got {getattr(p, name)}")
    _require(p.dp is None or p.dp >= 1, f"parallel.dp: must be >= 1, got {p.dp}")
    _require(p.pp_schedule in ("1f1b", "afab", "interleaved"),
             f"parallel.pp_schedule: {p.pp_schedule!r} is not 1f1b|afab|interleaved")
    _require(p.zero_stage in (0, 1), f"parallel.zero_stage: {p.zero_stage} is not 0 or 1")
    _require(p.grad_reduce_dtype in ("float32", "bfloat16"),
             f"parallel.grad_reduce_dtype: {p.grad_reduce_dtype!r} is not float32|bfloat16")
    _require(p.virtual_stages == 1 or p.pp_schedule == "interleaved",
             "parallel.virtual_stages: > 1 needs parallel.pp_schedule: interleaved")

    t = cfg.train
    for name in ("seq_len", "global_batch_size", "micro_batch_size", "train_steps"):
        _require(getattr(t, name) >= 1, f"train.{name}: must be >= 1, got {getattr(t, name)}")
    from nanotronix.data.blend import MAX_SAMPLES  # the sampler's: beyond it, its integer arithmetic overflows
    _require(t.train_steps * t.global_batch_size <= MAX_SAMPLES,
             f"train.train_steps: {t.train_steps} steps of {t.global_batch_size} samples are more than the sampler's "
             f"2^38 samples")
    # torch.manual_seed's range: a larger integer ended in an OverflowError traceback after the rendezvous
    _require(-2 ** 63 <= t.seed < 2 ** 64, f"train.seed: {t.seed} is not a 64-bit integer")
    _require(t.dtype in ("bfloat16", "float32"), f"train.dtype: {t.dtype!r} is not bfloat16|float32")
    _require(t.device in ("auto", "cpu", "cuda"), f"train.device: {t.device!r} is not auto|cpu|cuda")
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"train.global_batch_size: {t.global_batch_size} is not divisible by train.micro_batch_size="
             f"{t.micro_batch_size}")
    _require(t.recompute in ("none", "selective", "full"),
             f"train.recompute: {t.recompute!r} is not none|selective|full")
    _require(not t.bf16_weight_cache or t.dtype == "bfloat16",
             f"train.bf16_weight_cache: needs train.dtype bfloat16 (got {t.dtype!r}: there is nothing to cast)")
    _require(not t.grad_accumulation_fusion or t.bf16_weight_cache,
             "train.grad_accumulation_fusion: needs train.bf16_weight_cache: true (it fuses the bf16 copies' "
             "gradient accumulation)")
    skipped_step_ranges(t)
    _require(t.spike_skip_sigma >= 0, f"train.spike_skip_sigma: must be >= 0 (0: off), got {t.spike_skip_sigma}")
    _require(t.spike_skip_window >= 2, f"train.spike_skip_window: must be >= 2, got {t.spike_skip_window}")
    _require(t.loss_chunk_size >= 0, f"train.loss_chunk_size: must be >= 0 (0: plain loss), got {t.loss_chunk_size}")
    _require(t.compile_mode in COMPILE_MODES,
             f"train.compile_mode: {t.compile_mode!r} is not {'|'.join(COMPILE_MODES)} (the modes with CUDA graphs "
             "are not supported: the gradient buckets run Python hooks during every backward)")
    _require(t.compile_mode == "default" or t.compile,
             f"train.compile_mode: {t.compile_mode!r} needs train.compile: true")
    # Inductor already generates fused kernels for the same ops, and the compiled csrc ops are opaque to it.
    _require(not (t.compile and t.fused_kernels),
             "train.fused_kernels: cannot be combined with train.compile (compile fuses the same ops itself)")
    if m.document_mask_eos_id is not None:
        _require(0 <= m.document_mask_eos_id < m.vocab_size,
                 f"model.document_mask_eos_id: {m.document_mask_eos_id} is not a token id of the "
                 f"{m.vocab_size}-token vocabulary")
        _require(not t.fused_kernels, "train.fused_kernels: not yet implemented with model.document_mask_eos_id "
                                      "(the fused RoPE kernel takes one position per column, not per document)")
    _require(t.seq_len <= m.max_position_embeddings,
             f"train.seq_len: {t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")

    o = cfg.optimizer
    _require(o.lr >= 0, f"optimizer.lr: must be >= 0, got {o.lr}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optimizer.betas: expected two numbers in [0, 1), got {o.betas}")
    _require(o.eps > 0, "optimizer.eps: must be positive")
    _require(o.weight_decay >= 0, "optimizer.weight_decay: must be >= 0")
    _require(o.clip_grad >= 0, "optimizer.clip_grad: must be >= 0 (0 disables clipping)")

    s = cfg.lr_schedule
    _require(s.warmup_steps >= 0, "lr_schedule.warmup_steps: must be >= 0")
    _require(s.decay_style in ("linear", "cosine", "1-sqrt"),
             f"lr_schedule.decay_style: {s.decay_style!r} is not linear|cosine|1-sqrt")
    _require(0 <= s.min_lr <= o.lr, f"lr_schedule.min_lr: {s.min_lr} must be in [0, optimizer.lr={o.lr}]")
    if s.decay_start_step is not None:
        _require(s.decay_start_step >= s.warmup_steps,
                 f"lr_schedule.decay_start_step: {s.decay_start_step} is before the end of warm-up "
                 f"({s.warmup_steps})")
        _require(s.decay_steps >= 1, "lr_schedule.decay_steps: must be >= 1 when decay_start_step is set")
    else:
        _require(s.decay_steps == 0, f"lr_schedule.decay_steps: {s.decay_steps} without lr_schedule.decay_start_step: "
                                     "the learning rate would never decay (set both, or neither)")
        # the same for the decay's shape and floor: `decay_style: cosine` alone trained at a constant learning rate
        _require(s.decay_style == "linear", f"lr_schedule.decay_style: {s.decay_style} without "
                                            "lr_schedule.decay_start_step: the learning rate would never decay (set "
                                            "decay_start_step and decay_steps too)")
        _require(s.min_lr == 0, f"lr_schedule.min_lr: {s.min_lr} without lr_schedule.decay_start_step: the learning "
                                "rate would never decay to it (set decay_start_step and decay_steps too)")

    d = cfg.data
    _require(d.loader in ("pytorch", "dali"), f"data.loader: {d.loader!r} is not pytorch|dali")
    prev = 0
    for i, stage in enumerate(d.stages):
        where = f"data.stages.{i}"
        if i == 0:
            _require(stage.start_step in (0, 1), f"{where}.start_step: the first stage must start at step 1")
        else:
            _require(stage.start_step > prev,
                     f"{where}.start_step: {stage.start_step} does not come after the previous stage ({prev})")
        prev = max(stage.start_step, 1)  # a first stage's 0 is step 1: the next must start after that
        _require(len(stage.datasets) > 0, f"{where}.datasets: a stage needs at least one dataset")
        for j, ds in enumerate(stage.datasets):
            _require(bool(ds.path), f"{where}.datasets.{j}.path: missing")
            _require(ds.weight > 0 and math.isfinite(ds.weight),
                     f"{where}.datasets.{j}.weight: must be positive, got {ds.weight}")

    v = cfg.validation
    _require(v.interval >= 0, f"validation.interval: must be >= 0 (0: no validation), got {v.interval}")
    if v.interval > 0:
        _require(bool(v.data), "validation.data: missing (validation.interval > 0 needs a list of held-out token "
                               "stores)")
        _require(all(v.data), "validation.data: an empty path")
        _require(len(set(v.data)) == len(v.data), "validation.data: a path is listed twice")
        _require(v.num_samples >= 1, f"validation.num_samples: must be >= 1 with validation.interval > 0, got "
                                     f"{v.num_samples}")

    c = cfg.checkpoint
    _require(c.interval >= 0, "checkpoint.interval: must be >= 0")
    _require(c.keep_last >= 0, "checkpoint.keep_last: must be >= 0")
    _require(c.keep_every >= 0, "checkpoint.keep_every: must be >= 0 (0: none)")
    # steps past train.train_steps are allowed: a shortened run of a recipe just never reaches them
    _require(all(s >= 1 for s in c.keep_steps), f"checkpoint.keep_steps: steps are >= 1, got {c.keep_steps}")
    _require(bool(c.resume.strip()), "checkpoint.resume: must be auto, none or a checkpoint path")
    # an empty folder name was the current folder (logging) or silently no checkpoints at all
    _require(c.dir is None or bool(c.dir.strip()), "checkpoint.dir: empty (leave it out, or null, for no checkpoints)")
    _require(bool(cfg.logging.dir.strip()), "logging.dir: empty (name the folder for metrics.jsonl)")
    _require(cfg.logging.interval >= 1, "logging.interval: must be >= 1")
    _require(cfg.logging.hang_report_seconds >= 0, "logging.hang_report_seconds: must be >= 0 (0: off)")
    _require(cfg.logging.wandb_mode in ("online", "offline"),
             f"logging.wandb_mode: {cfg.logging.wandb_mode!r} is not online|offline")
    for key in ("wandb_entity", "wandb_name"):
        _require(getattr(cfg.logging, key) is None or cfg.logging.wandb_project is not None,
                 f"logging.{key}: needs logging.wandb_project (W&B logging is off without it)")
    profiled_step_range(cfg)
    _require(bool(cfg.logging.profile_ranks) and all(r >= 0 for r in cfg.logging.profile_ranks),
             f"logging.profile_ranks: expected a list of ranks >= 0, got {cfg.logging.profile_ranks}")
    _require(not cfg.logging.memory_snapshot or bool(cfg.logging.profile_steps.strip()),
             "logging.memory_snapshot: records the steps of logging.profile_steps, which is not set")
    _require(0 < p.collective_timeout_minutes <= MAX_COLLECTIVE_TIMEOUT_MINUTES,  # also refuses inf and nan
             f"parallel.collective_timeout_minutes: must be > 0 and at most {MAX_COLLECTIVE_TIMEOUT_MINUTES:g} (about "
             f"two years), got {p.collective_timeout_minutes}")
    _require(cfg.logging.hang_report_seconds < 60 * p.collective_timeout_minutes,
             f"logging.hang_report_seconds: {cfg.logging.hang_report_seconds:g} s is not below the collective timeout "
             f"(parallel.collective_timeout_minutes={p.collective_timeout_minutes:g}): the run would be aborted before "
             "the report; lower it, or set 0 to turn the report off")


def too_few_processes(p: ParallelConfig, world_size: int) -> Optional[str]:
    """What is wrong when the world cannot hold one model replica (tp*pp processes), else None: "not divisible"
    would send the user looking for a multiple when the job is simply too small (preflight adds the nodes)."""
    model_parallel = p.tp * p.pp
    if world_size >= model_parallel:
        return None
    return (f"parallel: tp*pp = {p.tp}*{p.pp} = {model_parallel} needs at least {model_parallel} processes, the job "
            f"has {world_size}")


def resolve_layout(cfg: Config, world_size: int) -> int:
    """Check the parallel layout against the world size and the model; return the data-parallel size."""
    p, t = cfg.parallel, cfg.train
    short = too_few_processes(p, world_size)
    if short:
        raise ConfigError(short)
    _require(world_size % (p.tp * p.pp) == 0,
             f"parallel: world size {world_size} is not divisible by tp*pp = {p.tp}*{p.pp}")
    dp = world_size // (p.tp * p.pp)
    _require(p.dp is None or p.dp == dp,
             f"parallel.dp: {p.dp} but world size {world_size} / (tp*pp = {p.tp * p.pp}) gives {dp}")
    check_parallel_shape(cfg)
    per_step = t.micro_batch_size * dp
    _require(t.global_batch_size % per_step == 0,
             f"train.global_batch_size: {t.global_batch_size} is not divisible by micro_batch_size*dp = "
             f"{t.micro_batch_size}*{dp}")
    micro_batches = t.global_batch_size // per_step
    if p.pp > 1 and p.pp_schedule == "1f1b":
        # torch.distributed.pipelining's 1F1B needs every stage busy before the first backward; its interleaved
        # schedule (rounds, below) also takes fewer micro-batches than stages (torch >= 2.5).
        _require(micro_batches >= p.pp,
                 f"parallel.pp_schedule: {p.pp_schedule} with pp={p.pp} needs at least {p.pp} micro-batches per "
                 f"step, but global_batch_size / (micro_batch_size*dp) = {micro_batches} (train.global_batch_size "
                 f"{p.pp * per_step} would give {p.pp})")
    if p.pp > 1 and p.pp_schedule == "interleaved":
        rounds = max(1, micro_batches // p.pp)
        if micro_batches % rounds:
            fits = [_interleaved_fit(micro_batches, p.pp, direction) for direction in (-1, 1)]
            raise ConfigError(f"parallel.pp_schedule: interleaved runs micro-batches in rounds of pp={p.pp}; "
                              f"{micro_batches} micro-batches per step is not a multiple of {rounds} rounds "
                              f"(train.global_batch_size {fits[0] * per_step} or {fits[1] * per_step} would give "
                              f"{fits[0]} or {fits[1]})")
    return dp


def _interleaved_fit(micro_batches: int, pp: int, direction: int) -> int:
    """The nearest count of micro-batches below (direction -1) or above (+1) `micro_batches` that the interleaved
    schedule runs in whole rounds (a multiple of max(1, count // pp)); pp itself always is one."""
    count = micro_batches + direction
    while count > pp and count % max(1, count // pp):
        count += direction
    return max(count, pp)


def check_parallel_shape(cfg: Config) -> None:
    """The layout's checks that need no world size (the model's split over tp and pp): `resolve_layout` makes them,
    and so does `--print-config`, which knows no world size but should not print a config no launch can run."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    _require(m.num_attention_heads % p.tp == 0,
             f"parallel.tp: {p.tp} does not divide model.num_attention_heads={m.num_attention_heads}")
    _require(m.num_key_value_heads % p.tp == 0,
             f"parallel.tp: {p.tp} does not divide model.num_key_value_heads={m.num_key_value_heads}")
    _require(m.intermediate_size % p.tp == 0,
             f"parallel.tp: {p.tp} does not divide model.intermediate_size={m.intermediate_size}")
    _require(m.vocab_size % p.tp == 0, f"parallel.tp: {p.tp} does not divide model.vocab_size={m.vocab_size}")
    chunks = p.pp * p.virtual_stages
    _require(m.num_hidden_layers >= chunks,
             f"parallel.pp: {m.num_hidden_layers} layers cannot fill {chunks} pipeline stages")
    _require(not p.sequence_parallel or t.seq_len % p.tp == 0,
             f"parallel.sequence_parallel: train.seq_len={t.seq_len} is not divisible by tp={p.tp}")
    if p.pp_schedule == "interleaved":
        _require(p.pp >= 2 and p.virtual_stages >= 2,
                 f"parallel.pp_schedule: interleaved needs pp >= 2 and virtual_stages >= 2, got pp={p.pp} "
                 f"virtual_stages={p.virtual_stages}")


def skipped_step_ranges(t: TrainConfig) -> list[tuple[int, int]]:
    """train.skip_steps as sorted inclusive (first, last) ranges, overlapping or adjacent ones merged."""
    ranges = [_step_range(text, "train.skip_steps", t.train_steps) for text in t.skip_steps]
    merged: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def profiled_step_range(cfg: Config) -> Optional[tuple[int, int]]:
    """logging.profile_steps as an inclusive (first, last) range, None when off."""
    text = cfg.logging.profile_steps
    return _step_range(text, "logging.profile_steps", cfg.train.train_steps) if text.strip() else None


def _step_range(text: str, where: str, train_steps: int) -> tuple[int, int]:
    """"A-B" (inclusive) or "N" as (A, B), within the run's steps."""
    first, dash, last = text.partition("-")
    def is_number(part: str) -> bool:  # ASCII digits: str.isdigit() also takes "²", which int() refuses
        return re.fullmatch(r"[0-9]+", part.strip()) is not None

    _require(is_number(first) and (not dash or is_number(last)),
             f"{where}: {text!r} is not a step N or a range A-B")
    a, b = int(first), int(last if dash else first)
    _require(1 <= a <= b <= train_steps,
             f"{where}: {text!r} is not within 1 <= A <= B <= train.train_steps={train_steps}")
    return a, b


def grad_accum_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
