"""Training throughput of nanotronix against a plain Hugging Face training loop, measured in one run.

    python tools/bench_train.py model.preset=smollm2-1.7b train.seq_len=2048 train.micro_batch_size=4 \\
        --accum 4 --warmup 3 --steps 5 --variant eager: \\
        --variant compiled:train.compile=true,train.loss_chunk_size=4096 --json bench.json

Positional arguments are dotted config overrides (as for `python -m nanotronix.train`), giving the model and
batch shape shared by every run. Each `--variant NAME:key=value,...` adds a nanotronix run with more overrides
(default: one run named `nanotronix` with the overrides as given). Every nanotronix run goes through the
trainer's own path: `parallelize` (single process: tp = pp = dp = 1), `DistributedOptimizer`, `train_step`.
The baseline is `transformers.LlamaForCausalLM` with the same shape and init std, SDPA attention, bf16
autocast when train.dtype is bfloat16, fp32 cross entropy on the full logits (what its own loss does), fused
AdamW on CUDA, gradient clipping, the same micro-batch, accumulation and token batches.

Reported per run: tokens/s per GPU, model TFLOP/s per GPU and MFU (nanotronix.train.flops: causal attention,
no embedding, recompute not counted), peak allocated memory, and the ratio of tokens/s to the baseline. Steps
are timed after `--warmup` steps (which include torch.compile's compilation); tokens are random (with
`--documents EOS_ID:MEAN_LENGTH`, EOS planted so that document masking has documents of that mean length).

`--profile NAME` runs one more step of that run under torch.profiler and prints where the device time went:
per kernel (top 25), and grouped into matmuls, attention, fused elementwise (Triton), copies/casts and the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)

import torch
import torch.nn.functional as F

from nanotronix import accel
from nanotronix.config import Config, TrainConfig, load_config
from nanotronix.config_tree import apply_override, read_yaml_tree
from nanotronix.cli import ArgumentParser, check_writable_folder, integer, one_line_errors, user_path, write_json_report
from nanotronix.errors import UserError, fail
from nanotronix.train.flops import device_peak_tflops, document_attention_span, flops_per_token, mfu
from nanotronix.train.profiler import own_times, summarize


@dataclass
class RunResult:
    name: str
    ok: bool = True
    error: Optional[str] = None
    tokens_per_sec_per_gpu: Optional[float] = None
    tflops_per_gpu: Optional[float] = None
    mfu: Optional[float] = None
    peak_memory_gb: Optional[float] = None
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    ratio_to_baseline: Optional[float] = None
    overrides: list[str] = field(default_factory=list)
    time_shares: Optional[dict] = None  # --profile: share of the profiled step's device time per kernel group


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)  # the summary above the options, the details below them
    ap = ArgumentParser(description=summary, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=details)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides shared by every run (model.preset=...)")
    ap.add_argument("--config", type=user_path, help="YAML config to start from (default: built-in defaults)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:k=v,k=v",
                    help="a nanotronix run with extra overrides (repeatable)")
    ap.add_argument("--accum", type=integer, default=1, help="micro-batches per optimizer step (default 1)")
    ap.add_argument("--warmup", type=integer, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--steps", type=integer, default=5, help="timed optimizer steps (default 5)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--baseline-only", action="store_true", help="run only the transformers baseline")
    ap.add_argument("--documents", metavar="EOS_ID:MEAN_LENGTH",
                    help="plant token EOS_ID in the random batches so that documents average MEAN_LENGTH tokens "
                         "(for runs with model.document_mask_eos_id=EOS_ID; random tokens alone hold ~no EOS)")
    ap.add_argument("--json", type=user_path, help="write every figure to this JSON file")
    ap.add_argument("--profile", action="append", default=[], metavar="NAME",
                    help="profile one extra step of this run and print its kernel-time breakdown (repeatable)")
    args = ap.parse_args(argv)
    for name in ("accum", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.documents is not None:
        eos, sep, mean = args.documents.partition(":")
        if not (sep and args.documents.isascii() and eos.isdigit() and mean.isdigit() and int(mean) >= 1):
            ap.error(f"--documents {args.documents!r}: expected EOS_ID:MEAN_LENGTH (two integers, length >= 1)")
        args.documents = (int(eos), int(mean))
    return args


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, spec = text.partition(":")
    if not sep or not name:
        raise UserError(f"--variant {text!r}: expected NAME:key=value,key=value")
    return name, [item for item in spec.split(",") if item]


def build_config(args: argparse.Namespace, extra: list[str], device: torch.device) -> Config:
    tree = read_yaml_tree(args.config) if args.config else {}
    # the device's training dtype where the config file names none (a default put among the overrides beat the
    # file's own: a recipe's bf16 ran in fp32 on the CPU, an fp32 config in bf16 on a GPU)
    train = tree.get("train")
    named = train.get("dtype") if isinstance(train, dict) else None
    defaults = [] if named is not None else [f"train.dtype={'bfloat16' if device.type == 'cuda' else 'float32'}"]
    overrides = defaults + list(args.overrides) + extra
    # the micro-batch (from the config file or an override) sets the global batch, before validation checks one
    # against the other
    for o in overrides:
        apply_override(tree, o)
    micro = (tree.get("train") or {}).get("micro_batch_size", TrainConfig.micro_batch_size)
    if not isinstance(micro, int) or micro < 1:
        raise UserError(f"train.micro_batch_size: must be a positive integer, got {micro!r}")
    overrides.append(f"train.global_batch_size={micro * args.accum}")
    overrides.append(f"train.train_steps={args.warmup + args.steps}")
    return load_config(args.config, overrides)


def make_batches(cfg: Config, count: int, accum: int,
                 documents: Optional[tuple[int, int]] = None) -> list[torch.Tensor]:
    """Random token batches [accum, micro-batch, seq + 1]; with documents = (eos, mean length), each token is
    replaced by eos with probability 1 / mean length (geometric document lengths, as packed corpora have)."""
    g = torch.Generator().manual_seed(1234)
    t = cfg.train
    shape = (accum, t.micro_batch_size, t.seq_len + 1)
    batches = [torch.randint(0, cfg.model.vocab_size, shape, generator=g) for _ in range(count)]
    if documents is not None:
        eos, mean = documents
        for b in batches:
            b.masked_fill_(torch.rand(shape, generator=g) < 1.0 / mean, eos)
    return [b.pin_memory() for b in batches] if torch.cuda.is_available() else batches


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs hold references to the last model's tensors
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------------
# the two training loops


def nanotronix_step_fn(cfg: Config, device: torch.device) -> Callable[[torch.Tensor], float]:
    from nanotronix.model import build_model
    from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
    from nanotronix.train.optimizer import param_groups
    from nanotronix.train.step import train_step

    torch.manual_seed(cfg.train.seed)
    ctx = ParallelContext.build(cfg)
    attn = accel.resolve_attention(cfg.model.attn_implementation, device, cfg.train.dtype)
    model = parallelize(build_model(cfg.model, attn, device), ctx, cfg)
    o = cfg.optimizer
    groups = param_groups(model.named_parameters(), o.weight_decay, o.weight_decay_norms)
    optimizer = DistributedOptimizer(model, groups, lr=o.lr,
                                     betas=tuple(o.betas), eps=o.eps, fused=device.type == "cuda")

    def step(batch: torch.Tensor) -> float:
        return train_step(model, optimizer, batch, o.lr, o.clip_grad).loss

    step.model = model  # kept alive by the closure; exposed for the caller's cleanup
    return step


def hf_step_fn(cfg: Config, device: torch.device) -> Callable[[torch.Tensor], float]:
    import transformers

    from nanotronix.convert.hf_mapping import hf_config_dict
    from nanotronix.train.optimizer import param_groups

    torch.manual_seed(cfg.train.seed)
    fields = {k: v for k, v in hf_config_dict(cfg.model).items()
              if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    hf_cfg = transformers.LlamaConfig(**fields)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    o = cfg.optimizer
    groups = param_groups(model.named_parameters(), o.weight_decay, o.weight_decay_norms)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    bf16 = cfg.train.dtype == "bfloat16"

    def step(batch: torch.Tensor) -> float:
        batch = batch.to(device, non_blocking=True)
        total = torch.zeros((), device=device)
        for micro in batch:
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                logits = model(input_ids=micro[:, :-1]).logits
            # transformers' own causal-LM loss upcasts the full logits to fp32 the same way
            loss = F.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten())
            (loss / batch.shape[0]).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, o.clip_grad if o.clip_grad > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (total / batch.shape[0]).item()

    step.model = model
    return step


def profile_step(step: Callable[[torch.Tensor], float], batch: torch.Tensor, device: torch.device, name: str) -> dict:
    """One step under torch.profiler: prints the top kernels and returns {group: share of device time}."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        step(batch)
        sync(device)
    found = summarize(own_times(prof, cuda))
    print(f"  [{name}] profile of one step: {found.total_ms:.0f} ms of {'GPU' if cuda else 'CPU'} time", flush=True)
    print("\n".join(f"    {line}" for line in [*found.top, f"by group: {found.groups()}"]), flush=True)
    return found.shares


def measure(name: str, build: Callable[[], Callable[[torch.Tensor], float]], cfg: Config, device: torch.device,
            batches: list[torch.Tensor], warmup: int, overrides: list[str], profile: bool = False,
            masks_documents: bool = True) -> RunResult:
    """masks_documents: the run attends within documents when the config names an EOS (the baseline never does: its
    FLOPs count full causal attention)."""
    result = RunResult(name=name, overrides=overrides)
    free_memory(device)
    step = None
    try:
        step = build()
        for i, batch in enumerate(batches):
            sync(device)
            t0 = time.perf_counter()
            loss = step(batch)  # returns a Python float: the step has finished on the device
            sync(device)
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {i + 1}")
            result.losses.append(loss)
            if i >= warmup:
                result.step_seconds.append(dt)
            print(f"  [{name}] step {i + 1}/{len(batches)} loss {loss:.4f} {dt * 1000:.0f} ms"
                  f"{' (warm-up)' if i < warmup else ''}", flush=True)
        if profile:
            try:  # the timed steps stand whatever befalls the extra, profiled one
                result.time_shares = profile_step(step, batches[-1], device, name)
            except Exception as e:  # CUPTI, out of memory, or the parsing of a CUDA profile no CPU run has made
                print(f"  [{name}] profile failed, timings kept: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}", flush=True)
    except torch.OutOfMemoryError as e:
        result.ok, result.error = False, f"out of memory: {str(e).splitlines()[0]}"
    except Exception as e:  # a backend or kernel the device lacks, a diverging run, a config the baseline refuses, or
        # a CUDA-only path that no CPU run takes failing on the GPU's torch (a TypeError, an AssertionError: the GPU
        # session gets one try): report it, run the next
        result.ok, result.error = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        del step
    if result.ok:
        t = cfg.train
        accum, micro, window = batches[0].shape
        assert (micro, window) == (t.micro_batch_size, t.seq_len + 1), "batches of another shape than the config's"
        tokens = accum * micro * t.seq_len
        rate = tokens * len(result.step_seconds) / sum(result.step_seconds)
        eos = cfg.model.document_mask_eos_id if masks_documents else None
        span = None if eos is None else sum(document_attention_span(b[..., :-1], eos) for b in batches) / len(batches)
        flops = flops_per_token(cfg.model, t.seq_len, span)
        result.tokens_per_sec_per_gpu = rate
        result.tflops_per_gpu = rate * flops / 1e12
        result.mfu = mfu(rate, flops, device_peak_tflops(device, t.dtype))
    if device.type == "cuda":
        result.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 1e9  # GB, as the trainer's metrics
    free_memory(device)
    return result


def format_table(results: list[RunResult]) -> str:
    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"
    w = max([24] + [len(r.name) for r in results])
    lines = [f"{'run':<{w}} {'tokens/s/GPU':>13} {'TFLOP/s/GPU':>12} {'MFU':>7} {'peak GB':>8} {'vs HF':>7}"]
    for r in results:
        if not r.ok:
            lines.append(f"{r.name:<{w}} {r.error}")
            continue
        lines.append(f"{r.name:<{w}} {fmt(r.tokens_per_sec_per_gpu, ',.0f'):>13} {fmt(r.tflops_per_gpu, '.1f'):>12} "
                     f"{fmt(r.mfu and 100 * r.mfu, '.1f') + ('%' if r.mfu else ''):>7} "
                     f"{fmt(r.peak_memory_gb, '.1f'):>8} "
                     f"{fmt(r.ratio_to_baseline, '.2f') + ('x' if r.ratio_to_baseline else ''):>7}")
    return "\n".join(lines)


@one_line_errors
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = [parse_variant(v) for v in args.variant] or [("nanotronix", [])]
    base = build_config(args, [], device)
    configs = [(name, extra, build_config(args, extra, device)) for name, extra in variants]
    if args.no_baseline and args.baseline_only:
        return fail("--no-baseline and --baseline-only: together they leave nothing to run")
    unknown = sorted(set(args.profile) - {name for name, _ in variants} - {"hf-transformers"})
    if unknown:
        return fail(f"--profile {unknown[0]}: no run of that name (runs: hf-transformers, "
                    f"{', '.join(name for name, _ in variants)})")
    t, m = base.train, base.model
    smallest_vocab = min(cfg.model.vocab_size for cfg in [base] + [c for _, _, c in configs])
    if args.documents is not None and args.documents[0] >= smallest_vocab:
        return fail(f"--documents {args.documents[0]}:{args.documents[1]}: the EOS id is outside the vocabulary "
                    f"({smallest_vocab})")
    batches = make_batches(base, args.warmup + args.steps, args.accum, args.documents)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    attention = accel.describe(accel.resolve_attention("auto", device, "bfloat16"))
    print(f"device: {name} | torch {torch.__version__} | {attention}"
          f" | kernels: {'csrc built' if accel.compiled_kernels() is not None else 'csrc not built'}"
          f"{', fp32-accumulating GEMM' if accel.fp32_accumulating_gemm() else ''}")
    print(f"model: {m.preset or 'custom'} {m.num_parameters() / 1e6:.1f}M params, {m.num_hidden_layers} layers | "
          f"seq {t.seq_len} x micro-batch {t.micro_batch_size} x accum {args.accum} = "
          f"{t.seq_len * t.micro_batch_size * args.accum} tokens/step | {t.dtype} | "
          f"warm-up {args.warmup}, timed {args.steps} | {flops_per_token(m, t.seq_len) / 1e9:.3f} GFLOP/token",
          flush=True)

    results: list[RunResult] = []
    baseline = None

    def report() -> str:
        """The table so far, and the JSON rewritten after every run: a run cut short (a device time limit) keeps
        the figures of the runs that finished."""
        for r in results:
            if baseline is not None and baseline.ok and r.ok:
                r.ratio_to_baseline = r.tokens_per_sec_per_gpu / baseline.tokens_per_sec_per_gpu
        table = format_table(results)
        if args.json:
            write_json_report(args.json, {
                "device": name, "torch": torch.__version__, "model": asdict(m), "seq_len": t.seq_len,
                "micro_batch_size": t.micro_batch_size, "accum": args.accum, "warmup": args.warmup,
                "steps": args.steps, "dtype": t.dtype, "flops_per_token": flops_per_token(m, t.seq_len),
                "peak_tflops": device_peak_tflops(device, t.dtype), "argv": sys.argv[1:] if argv is None else argv,
                "results": [asdict(r) for r in results], "table": table,
            })
        return table

    if args.json:  # an unusable --json path is said now, not after the runs (an older report stays until then)
        if Path(args.json).is_dir():
            return fail(f"--json {args.json} is a folder; name the JSON file to write")
        check_writable_folder(Path(args.json).resolve().parent, "--json")
    if not args.no_baseline:
        baseline = measure("hf-transformers", lambda: hf_step_fn(base, device), base, device, batches,
                           args.warmup, [], profile="hf-transformers" in args.profile, masks_documents=False)
        results.append(baseline)
        report()
    if not args.baseline_only:
        for vname, extra, cfg in configs:
            # a run with its own micro-batch size, sequence length or vocabulary gets batches of its own (the same
            # accumulation)
            same = (cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.vocab_size) == \
                (t.micro_batch_size, t.seq_len, m.vocab_size)
            own = batches if same else make_batches(cfg, args.warmup + args.steps, args.accum, args.documents)
            results.append(measure(vname, lambda cfg=cfg: nanotronix_step_fn(cfg, device), cfg, device, own,
                                   args.warmup, extra, profile=vname in args.profile))
            report()
    print(report(), flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
