"""Typed run configuration: the dataclasses of a config's sections, the SmolLM2 presets, and loading a config from
YAML and dotted overrides.

A config is read in three steps (the generic ones in nanotronix/config_tree.py): the YAML file becomes a nested
dict, dotted command-line overrides (`train.train_steps=20 parallel.tp=2`) are applied to that dict, and the dict
is turned into the dataclasses below; then presets fill what was left out and `validate` (nanotronix/config_checks.py,
with the parallel layout's checks against a world size) checks the whole. Every step rejects what it does not
understand with a `ConfigError` whose message names the offending field, so a command can print it as one line and
exit non-zero.

Steps are counted from 1: step s is the s-th optimizer update. A data stage with `start_step: s`
feeds steps s, s+1, ... until the next stage starts.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from nanotronix.config_checks import validate
from nanotronix.config_tree import StepText, apply_override, build_dataclass, read_yaml_tree
from nanotronix.errors import ConfigError


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
    # with compile: inductor (it generates the kernels: the speed) | aot_eager_decomp_partition (the same graphs,
    # decompositions and partitioner as Inductor's, run by eager kernels: no code generated or compiled, so it
    # separates a fault in Inductor's generated code from one in the traced graphs) | aot_eager (default
    # partitioner)
    compile_backend: str = "inductor"
    recompute: str = "none"  # none | selective (save matmul/attention outputs only) | full (whole layer)
    fused_kernels: bool = False  # csrc/ CUDA kernels for add+RMSNorm, RoPE, SwiGLU (PyTorch twin elsewhere)
    loss_chunk_size: int = 0  # > 0: fused head + cross entropy over chunks of this many tokens (no full logits)
    bf16_weight_cache: bool = False  # bf16 decoder weights cast once per step, not per micro-batch (dtype bfloat16)
    grad_accumulation_fusion: bool = False  # with bf16_weight_cache: wgrad GEMMs accumulate into the fp32 buckets
    # steps not trained ("A-B" inclusive, or "N"; Megatron's --skip-train-iteration-range): their batches are passed
    # over, no update is made, the learning rate goes on by step. After a loss spike: resume from a checkpoint before
    # it with the steps around it skipped, so the run meets other data.
    skip_steps: list[StepText] = field(default_factory=list)
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
    profile_steps: StepText = StepText("")
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
# loading


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
    absolute too (checkpoints keep the config: the export reads the tokenizer from any folder); a Hub id stays.
    A leading `~` is expanded in each (the dataset's key, which orders its samples, is then the same however the
    path is spelled)."""
    def local(path: str) -> str:  # `~/x` (a shell leaves it after `=`) is /home/u/x: one store, one dataset key
        return os.path.expanduser(path) if path.startswith("~") else path

    if data.tokenizer:
        data.tokenizer = local(data.tokenizer)
        if not os.path.isabs(data.tokenizer) and os.path.exists(data.tokenizer):
            data.tokenizer = os.path.abspath(data.tokenizer)
    root_is_url = data.root is not None and "://" in data.root  # an fsspec URL (zarr stores): join as a string
    if data.root is not None and not root_is_url:
        data.root = os.path.abspath(os.path.expanduser(data.root))

    def joined(path: str) -> str:
        path = local(path)
        if data.root is None or not path or "://" in path or os.path.isabs(path):
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


def grad_accum_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
