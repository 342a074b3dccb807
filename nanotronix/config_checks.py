"""Which config values a run can train with: `validate` (which `load_config` ends with) checks each section and how
the sections fit one another; `check_parallel_shape` and `resolve_layout` check the parallel layout against the
model and the world size; `skipped_step_ranges` and `profiled_step_range` parse the step ranges that the trainer
and the profiler use.

This is separate from nanotronix/config.py, which holds the dataclasses, the presets and the loading: the schema
says what a config contains, and this module says which values go together. Each failed check raises one
`ConfigError` that names the field. nanotronix.config imports this module to validate what it loads; this module
imports the dataclasses only for type annotations, so neither module imports the other at run time.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Optional

from nanotronix.errors import ConfigError, number_text

if TYPE_CHECKING:  # nanotronix.config imports this module (load_config validates what it builds)
    from nanotronix.config import (CheckpointConfig, Config, DataConfig, LRScheduleConfig, ModelConfig,
                                   OptimizerConfig, ParallelConfig, TrainConfig, ValidationConfig)


# torch.compile modes for train.compile_mode ("default" passes no mode); none with CUDA graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# torch.compile backends for train.compile_backend: Inductor, and two that trace the same way but generate no code.
COMPILE_BACKENDS = ("inductor", "aot_eager_decomp_partition", "aot_eager")

# parallel.collective_timeout_minutes' ceiling (~2 years): torch's stores take the timeout in milliseconds as a 64-bit
# integer, and infinity has no timedelta at all.
MAX_COLLECTIVE_TIMEOUT_MINUTES = 1e6


# --------------------------------------------------------------------------------------------------
# the whole config (load_config)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    validate_model(cfg.model)
    validate_model_export(cfg.model)
    _validate_run(cfg)


MAX_WEIGHT_ELEMENTS = 2**61 - 1  # fp32 bytes within int64, torch's sizes (SmolLM2-1.7B's largest: 2^27)


def validate_model(m: ModelConfig) -> None:
    """The model section's own checks (also run on a Hugging Face config.json by convert_from_hf)."""
    optional = ("preset", "document_mask_eos_id", "initializer_range")
    missing = [f.name for f in dataclasses.fields(m) if f.name not in optional and getattr(m, f.name) is None]
    _require(not missing, f"model.{', model.'.join(missing)}: missing (set {'it' if len(missing) == 1 else 'them'} "
                          f"or use model.preset, e.g. smollm2-135m)")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        _require(getattr(m, name) > 0, f"model.{name}: must be positive, got {number_text(getattr(m, name))}")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size: {number_text(m.hidden_size)} is not divisible by model.num_attention_heads="
             f"{number_text(m.num_attention_heads)}")
    _require(m.num_attention_heads % m.num_key_value_heads == 0,
             f"model.num_attention_heads: {number_text(m.num_attention_heads)} is not a multiple of "
             f"model.num_key_value_heads={number_text(m.num_key_value_heads)}")
    _require(m.head_dim % 2 == 0, f"model.hidden_size: head dim {number_text(m.head_dim)} must be even for RoPE")
    # a weight whose fp32 bytes torch cannot count in int64 (a typo, an edited checkpoint.json: vocab_size 2^63) is
    # an overflow traceback deep in building the model, even on the meta device; smaller ones too large for the host
    # are an out of memory, said as that
    rows = {"vocab_size": m.vocab_size, "intermediate_size": 2 * m.intermediate_size,
            "num_key_value_heads": m.hidden_size + 2 * m.num_key_value_heads * m.head_dim}
    name = max(rows, key=rows.get)
    _require(rows[name] * m.hidden_size <= MAX_WEIGHT_ELEMENTS,
             f"model.{name}: {number_text(getattr(m, name))} makes a weight of {number_text(rows[name])} x "
             f"{number_text(m.hidden_size)} (hidden_size) elements, more than torch can size (2^61)")
    _require(m.rope_theta > 0, "model.rope_theta: must be positive")
    _require(m.rms_norm_eps > 0, "model.rms_norm_eps: must be positive")
    _require(m.init_std > 0, "model.init_std: must be positive")
    _require(m.initializer_range is None or m.initializer_range >= 0,  # 0 too: transformers reads 0 to 1 there
             "model.initializer_range: must not be negative")
    _require(m.attn_implementation in ("auto", "sdpa", "sdpa_cudnn", "flash_attention_2", "flex", "eager"),
             f"model.attn_implementation: {m.attn_implementation!r} is not "
             "auto|sdpa|sdpa_cudnn|flash_attention_2|flex|eager")


def validate_model_export(m: ModelConfig) -> None:
    """What the Hugging Face export writes of the model that transformers bounds tighter than training does: it
    refuses a config.json whose initializer_range (model.initializer_range, else model.init_std) is past 1. Checked
    when a run's config loads, not only by the export: a run no export of which transformers loads is a trap found
    only after training. An init_std past 1 is no SmolLM2 setting (0.02-0.042): with every matrix drawn from
    Normal(0, init_std), activations grow by about init_std * sqrt(hidden_size) per matmul; a run that means it says
    in model.initializer_range what its export writes. Not part of validate_model, which the readers of a saved
    checkpoint run: evaluating a checkpoint saved before this check needs no export."""
    if m.initializer_range is None:
        _require(m.init_std <= 1, f"model.init_std: {m.init_std} is more than 1, which a Hugging Face export writes as "
                                  "config.json's initializer_range, where transformers reads 0 to 1: set "
                                  "model.initializer_range (0 to 1) for the export to write in its place")
    else:
        _require(m.initializer_range <= 1, f"model.initializer_range: {m.initializer_range} is more than 1 "
                                           "(config.json's initializer_range, where transformers reads 0 to 1)")


def _validate_run(cfg: Config) -> None:
    """Everything but the model section's own checks: the layout, training, data and their fit to the model; one
    function per subject, each on its own sections (a config wrong in several places says the first of them)."""
    _check_parallel(cfg.parallel)
    _check_train(cfg.train)
    _check_speed_switches(cfg.train)
    _check_fit_to_model(cfg.train, cfg.model)
    _check_optimizer(cfg.optimizer)
    _check_lr_schedule(cfg.lr_schedule, cfg.optimizer.lr)
    validate_data(cfg.data)
    _check_validation(cfg.validation, cfg.data.root)
    _check_checkpoint(cfg.checkpoint)
    _check_logging(cfg)


def _check_parallel(p: ParallelConfig) -> None:
    """The parallel section's own values (their fit to the model and the world size: check_parallel_shape and
    resolve_layout)."""
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
    _require(0 < p.collective_timeout_minutes <= MAX_COLLECTIVE_TIMEOUT_MINUTES,  # also refuses inf and nan
             f"parallel.collective_timeout_minutes: must be > 0 and at most {MAX_COLLECTIVE_TIMEOUT_MINUTES:g} (about "
             f"two years), got {p.collective_timeout_minutes}")


def _check_train(t: TrainConfig) -> None:
    """The run's size (steps, batch, sequence), seed, dtype and device, and the steps it skips."""
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
    skipped_step_ranges(t)
    _require(t.spike_skip_sigma >= 0, f"train.spike_skip_sigma: must be >= 0 (0: off), got {t.spike_skip_sigma}")
    _require(t.spike_skip_window >= 2, f"train.spike_skip_window: must be >= 2, got {t.spike_skip_window}")


def _check_speed_switches(t: TrainConfig) -> None:
    """train's speed switches (recomputation, weight cache, fused loss, compile, fused kernels) and their pairings."""
    _require(t.recompute in ("none", "selective", "full"),
             f"train.recompute: {t.recompute!r} is not none|selective|full")
    _require(not t.bf16_weight_cache or t.dtype == "bfloat16",
             f"train.bf16_weight_cache: needs train.dtype bfloat16 (got {t.dtype!r}: there is nothing to cast)")
    _require(not t.grad_accumulation_fusion or t.bf16_weight_cache,
             "train.grad_accumulation_fusion: needs train.bf16_weight_cache: true (it fuses the bf16 copies' "
             "gradient accumulation)")
    _require(t.loss_chunk_size >= 0, f"train.loss_chunk_size: must be >= 0 (0: plain loss), got {t.loss_chunk_size}")
    _require(t.compile_mode in COMPILE_MODES,
             f"train.compile_mode: {t.compile_mode!r} is not {'|'.join(COMPILE_MODES)} (the modes with CUDA graphs "
             "are not supported: the gradient buckets run Python hooks during every backward)")
    _require(t.compile_mode == "default" or t.compile,
             f"train.compile_mode: {t.compile_mode!r} needs train.compile: true")
    _require(t.compile_backend in COMPILE_BACKENDS,
             f"train.compile_backend: {t.compile_backend!r} is not {'|'.join(COMPILE_BACKENDS)}")
    _require(t.compile_backend == "inductor" or t.compile,
             f"train.compile_backend: {t.compile_backend!r} needs train.compile: true")
    _require(t.compile_mode == "default" or t.compile_backend == "inductor",
             f"train.compile_mode: {t.compile_mode!r} is Inductor's: it needs train.compile_backend: inductor "
             f"(got {t.compile_backend!r})")
    _require(not (t.grad_accumulation_fusion and t.compile and t.compile_backend != "inductor"),
             f"train.grad_accumulation_fusion: needs train.compile_backend: inductor under train.compile (got "
             f"{t.compile_backend!r}: only Inductor turns the traced copy of a gradient buffer back into the buffer "
             "the fused accumulation adds into)")
    # Inductor already generates fused kernels for the same ops, and the compiled csrc ops are opaque to it.
    _require(not (t.compile and t.fused_kernels),
             "train.fused_kernels: cannot be combined with train.compile (compile fuses the same ops itself)")


def _check_fit_to_model(t: TrainConfig, m: ModelConfig) -> None:
    """What training asks of the model: the document mask's EOS id in its vocabulary, the sequence within its
    positions."""
    if m.document_mask_eos_id is not None:
        _require(0 <= m.document_mask_eos_id < m.vocab_size,
                 f"model.document_mask_eos_id: {m.document_mask_eos_id} is not a token id of the "
                 f"{m.vocab_size}-token vocabulary")
        _require(not t.fused_kernels, "train.fused_kernels: not yet implemented with model.document_mask_eos_id "
                                      "(the fused RoPE kernel takes one position per column, not per document)")
    _require(t.seq_len <= m.max_position_embeddings,
             f"train.seq_len: {t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")


def _check_optimizer(o: OptimizerConfig) -> None:
    _require(o.lr >= 0, f"optimizer.lr: must be >= 0, got {o.lr}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optimizer.betas: expected two numbers in [0, 1), got {o.betas}")
    _require(o.eps > 0, "optimizer.eps: must be positive")
    _require(o.weight_decay >= 0, "optimizer.weight_decay: must be >= 0")
    _require(o.clip_grad >= 0, "optimizer.clip_grad: must be >= 0 (0 disables clipping)")


def _check_lr_schedule(s: LRScheduleConfig, lr: float) -> None:
    """Warm-up, decay and floor; `lr` is optimizer.lr, the peak that min_lr may not exceed."""
    _require(s.warmup_steps >= 0, "lr_schedule.warmup_steps: must be >= 0")
    _require(s.decay_style in ("linear", "cosine", "1-sqrt"),
             f"lr_schedule.decay_style: {s.decay_style!r} is not linear|cosine|1-sqrt")
    _require(0 <= s.min_lr <= lr, f"lr_schedule.min_lr: {s.min_lr} must be in [0, optimizer.lr={lr}]")
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


def validate_data(d: DataConfig) -> None:
    """The loader and the stages: the first starting at step 1, each after the one before, each with datasets (also
    run on a checkpoint's saved data section, whose stages a resume compares with the config's)."""
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


def _check_validation(v: ValidationConfig, root: Optional[str]) -> None:
    """With an interval, held-out stores to score (each once, each under a name of its own) and a number of
    windows."""
    _require(v.interval >= 0, f"validation.interval: must be >= 0 (0: no validation), got {v.interval}")
    if v.interval > 0:
        _require(bool(v.data), "validation.data: missing (validation.interval > 0 needs a list of held-out token "
                               "stores)")
        _require(all(v.data), "validation.data: an empty path")
        _require(len(set(v.data)) == len(v.data), "validation.data: a path is listed twice")
        from nanotronix.data.schedule import dataset_order_key  # what names each store's loss in val_losses
        named: dict[str, str] = {}
        for path in v.data:
            key = dataset_order_key(path, root)
            first = named.setdefault(key, path)
            _require(first == path, f"validation.data: {first} and {path} have one name in val_losses, {key} (a store "
                                    "file's suffix, ./ and doubled slashes do not count): name each store once, and "
                                    "stores side by side by more than a suffix")
        _require(v.num_samples >= 1, f"validation.num_samples: must be >= 1 with validation.interval > 0, got "
                                     f"{v.num_samples}")


def _check_checkpoint(c: CheckpointConfig) -> None:
    _require(c.interval >= 0, "checkpoint.interval: must be >= 0")
    _require(c.keep_last >= 0, "checkpoint.keep_last: must be >= 0")
    _require(c.keep_every >= 0, "checkpoint.keep_every: must be >= 0 (0: none)")
    # steps past train.train_steps are allowed: a shortened run of a recipe just never reaches them
    _require(all(s >= 1 for s in c.keep_steps), f"checkpoint.keep_steps: steps are >= 1, got {c.keep_steps}")
    _require(bool(c.resume.strip()), "checkpoint.resume: must be auto, none or a checkpoint path")
    # an empty folder name was the current folder (logging) or silently no checkpoints at all
    _require(c.dir is None or bool(c.dir.strip()), "checkpoint.dir: empty (leave it out, or null, for no checkpoints)")


def _check_logging(cfg: Config) -> None:
    """The logging section, and what it is measured against: profile_steps within train.train_steps, the hang report
    before the collective timeout (which _check_parallel has bounded, so a nan cannot slip through here)."""
    log, timeout = cfg.logging, cfg.parallel.collective_timeout_minutes
    _require(bool(log.dir.strip()), "logging.dir: empty (name the folder for metrics.jsonl)")
    _require(log.interval >= 1, "logging.interval: must be >= 1")
    _require(log.hang_report_seconds >= 0, "logging.hang_report_seconds: must be >= 0 (0: off)")
    _require(log.wandb_mode in ("online", "offline"),
             f"logging.wandb_mode: {log.wandb_mode!r} is not online|offline")
    for key in ("wandb_entity", "wandb_name"):
        _require(getattr(log, key) is None or log.wandb_project is not None,
                 f"logging.{key}: needs logging.wandb_project (W&B logging is off without it)")
    profiled_step_range(cfg)
    _require(bool(log.profile_ranks) and all(r >= 0 for r in log.profile_ranks),
             f"logging.profile_ranks: expected a list of ranks >= 0, got {log.profile_ranks}")
    _require(not log.memory_snapshot or bool(log.profile_steps.strip()),
             "logging.memory_snapshot: records the steps of logging.profile_steps, which is not set")
    _require(log.hang_report_seconds < 60 * timeout,
             f"logging.hang_report_seconds: {log.hang_report_seconds:g} s is not below the collective timeout "
             f"(parallel.collective_timeout_minutes={timeout:g}): the run would be aborted before "
             "the report; lower it, or set 0 to turn the report off")


# --------------------------------------------------------------------------------------------------
# the parallel layout against the model and the world size


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


# --------------------------------------------------------------------------------------------------
# step ranges ("A-B" or "N"), read by the checks above and by the trainer and profiler


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

