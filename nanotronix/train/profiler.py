"""torch.profiler over a window of training steps (`logging.profile_steps`) on chosen ranks (`logging.profile_ranks`).

Where the time of a real step goes on the real layout (its communication, pipeline bubbles, data waits and
checkpoint saves included), which `tools/bench_train.py --profile` cannot show. Each profiling rank writes to
LOGGING_DIR/profile/:
  - `rank{R}_steps_{A}-{B}.json.gz`: a Chrome trace (https://ui.perfetto.dev or chrome://tracing), each step a range
    named `nanotronix step N`;
  - `rank{R}_steps_{A}-{B}.txt`: the top ops by their own device time (CPU time on CPU) and that time split into
    kernel groups (matmul, attention, communication, ...), whose one-line form the rank also prints;
  - with `logging.memory_snapshot` (CUDA): `rank{R}_steps_{A}-{B}_memory.pickle`, the caching allocator's history
    over the steps (drop it on https://pytorch.org/memory_viz).
The window opens before step A reads its batch and closes after step B's checkpoint; a run that stops inside it
(preemption) writes the steps it profiled. Files appear whole (written aside, then renamed).

torch.profiler records and exports; what is ours is the step window, the files and the kernel groups
(`kernel_group`, shared with bench_train) that turn thousands of kernel names into a few shares.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch.autograd import DeviceType

from nanotronix.config import Config, ConfigError
from nanotronix.config_checks import profiled_step_range
from nanotronix.console import say

STEP_LABEL = "nanotronix step "  # the trace's range of each profiled step

# Kernel groups by substrings of the op / kernel names (first match wins).
KERNEL_GROUPS = [
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn_generated_fort_native_sdpa")),
    ("communication", ("nccl", "gloo", "c10d::", "record_param_comms", "allreduce", "all_reduce", "allgather",
                       "all_gather", "reduce_scatter")),  # not "broadcast": aten::broadcast_tensors is no collective
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "sm90_", "sm80_", "addmm", "aten::mm", "aten::bmm",
                "accumulate_weight_grad")),  # the last: train.grad_accumulation_fusion's wgrad GEMM (its CPU twin)
    ("fused elementwise (triton)", ("triton",)),
    ("copy / cast", ("copy", "_to_copy", "cast", "memcpy", "memset", "fill")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
]


def _is_gemm_template(low: str) -> bool:
    """Inductor's own GEMMs (train.compile_mode: max-autotune-*): template kernels named after the ops they fuse,
    `triton_tem_fused_mm_0`, `triton_tem_fused_add_addmm_3`, ... (FlexAttention's templates name attention, which
    the attention group meets first)."""
    return low.startswith("triton_tem_") and "mm" in low


def kernel_group(name: str) -> str:
    low = name.lower()
    for group, keys in KERNEL_GROUPS:
        if any(k in low for k in keys) or (group == "matmul" and _is_gemm_template(low)):
            return group
    return "other"


def own_times(prof: torch.profiler.profile, cuda: bool) -> list[tuple[str, float, int]]:
    """(op or kernel name, own time in microseconds, calls) of what a profile recorded: on CUDA the kernels' device
    time (a CPU op also reports the device time of the kernels it launched: counted once, as kernels), else the CPU
    ops' self time (ops nest on CPU; their self times sum to the profiled time). Step ranges are left out, and on CUDA
    the GPU projections of `record_function` ranges (`gpu_user_annotation`: Inductor's "## Call CompiledFxGraph"
    around each compiled graph, the optimizer's step), whose "self" device time is their whole span (torch's own
    table leaves them out too, pytorch/pytorch#130730)."""
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    return [(e.key, getattr(e, attr), e.count) for e in prof.key_averages()
            if getattr(e, attr) > 0 and not e.key.startswith(("ProfilerStep", STEP_LABEL))
            and not (cuda and (e.device_type == DeviceType.CPU or getattr(e, "is_user_annotation", False)))]


class Summary(NamedTuple):
    total_ms: float
    shares: dict[str, float]  # kernel group -> share of the total
    top: list[str]  # "<share>%  <ms> ms  x<calls> <name>" of the longest rows

    def groups(self) -> str:
        return ", ".join(f"{g} {100 * v:.1f}%" for g, v in sorted(self.shares.items(), key=lambda kv: -kv[1]))


def summarize(rows: list[tuple[str, float, int]], top: int = 25) -> Summary:
    """`own_times` rows: their total, each kernel group's share of it, and the `top` longest rows as lines."""
    total = sum(t for _, t, _ in rows) or 1.0
    shares: dict[str, float] = {}
    for key, t, _ in rows:
        shares[kernel_group(key)] = shares.get(kernel_group(key), 0.0) + t / total
    lines = [f"{100 * t / total:5.1f}%  {t / 1e3:8.1f} ms  x{count:<6} {key[:100]}"
             for key, t, count in sorted(rows, key=lambda r: -r[1])[:top]]
    return Summary(total / 1e3, shares, lines)


class StepProfiler:
    """`begin(n)` and `end(n)` around each step of the loop, `close()` after it. Does nothing on ranks (and steps) not
    profiled."""

    def __init__(self, window: Optional[tuple[int, int]], out_dir: Path, rank: int, device: torch.device,
                 memory: bool):
        self.window, self.out_dir, self.rank, self.memory = window, out_dir, rank, memory
        self.cuda = device.type == "cuda"
        self.prof: Optional[torch.profiler.profile] = None
        self.range: Optional[torch.profiler.record_function] = None  # the step's range in the trace
        self.first = self.last = 0  # the steps profiled so far

    @classmethod
    def from_config(cls, cfg: Config, rank: int, world_size: int, device: torch.device) -> "StepProfiler":
        lg = cfg.logging
        window = profiled_step_range(cfg)
        if window is not None:
            if max(lg.profile_ranks) >= world_size:
                raise ConfigError(f"logging.profile_ranks: {lg.profile_ranks} names a rank this run does not have "
                                  f"(its ranks are 0-{world_size - 1})")
            if lg.memory_snapshot and device.type != "cuda":
                raise ConfigError(f"logging.memory_snapshot: records the CUDA caching allocator; this run is on "
                                  f"{device.type}")
        on = window is not None and rank in lg.profile_ranks
        return cls(window if on else None, Path(lg.dir) / "profile", rank, device, lg.memory_snapshot)

    def begin(self, step: int) -> None:
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            return
        if self.prof is None:
            self._start(step)
        self.last = step
        self.range = torch.profiler.record_function(f"{STEP_LABEL}{step}")
        self.range.__enter__()

    def end(self, step: int) -> None:
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None
        if self.window is not None and step == self.window[1]:
            self.close()

    def close(self) -> None:
        """Stop and write what was profiled (a run that ended inside the window: its steps so far)."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        if self.cuda:
            torch.cuda.synchronize()
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}_steps_{self.first}-{self.last}"
        trace = self.out_dir / f"{stem}.json.gz"
        _write_aside(trace, prof.export_chrome_trace)  # torch gzips a path ending in .gz
        if self.memory:
            _write_aside(self.out_dir / f"{stem}_memory.pickle", torch.cuda.memory._dump_snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        found = summarize(own_times(prof, self.cuda), top=40)
        what = (f"profile of steps {self.first}-{self.last} (rank {self.rank}): {found.total_ms:.0f} ms of "
                f"{'GPU' if self.cuda else 'CPU'} time")
        text = "\n".join([what, *found.top, f"by group: {found.groups()}"]) + "\n"
        _write_aside(self.out_dir / f"{stem}.txt", lambda path: Path(path).write_text(text))
        say(f"{what}: {found.groups()} -> {trace}")

    def _start(self, step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.memory:
                # Python frames only (Inductor's generated code included), which is what memory_viz shows: torch's
                # default also records C++ frames, symbolized when the snapshot is dumped, which took minutes
                # there (torchtitan measured 461 s against 4 s, pytorch/torchtitan#3628) and crashed on Inductor's
                # generated code (pytorch/torchtitan#2991): a profiled compiled run would lose its window.
                torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.start()
        self.first = step


def _write_aside(path: Path, write) -> None:
    """`write(name)` to a temporary name beside `path` (keeping its suffixes), then rename: no half-written file."""
    tmp = path.with_name(f".partial.{path.name}")
    write(str(tmp))
    os.replace(tmp, path)
