"""`logging.profile_steps` / `logging.profile_ranks`: the real trainer under torchrun (2 gloo ranks, DP2) profiles steps
3-4 on rank 1 only and goes on training (~10 s on 2 cores). The trace is torch.profiler's own Chrome trace; the
summary is checked against it (each op's call count), and the trace against the window (exactly the ranges of steps 3
and 4, in order, holding the model's matmuls and the gradient all-reduce)."""
from __future__ import annotations

import gzip
import json
import re

from helpers import tiny_config, torchrun, write_learnable_store


def test_profiled_steps_leave_a_trace_and_a_summary_on_the_chosen_rank(tmp_path):
    cfg = tiny_config(tmp_path, write_learnable_store(tmp_path / "arith"))
    proc = torchrun(2, ["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=5",
                        "logging.profile_steps=3-4", "logging.profile_ranks=[1]"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]

    out = tmp_path / "logs" / "profile"
    assert sorted(p.name for p in out.iterdir()) == ["rank1_steps_3-4.json.gz", "rank1_steps_3-4.txt"]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("profile of")]
    assert len(printed) == 1 and printed[0].startswith("profile of steps 3-4 (rank 1): "), proc.stdout
    assert printed[0].endswith(f"-> {out / 'rank1_steps_3-4.json.gz'}")

    events = [e for e in json.loads(gzip.decompress((out / "rank1_steps_3-4.json.gz").read_bytes()))["traceEvents"]
              if e.get("ph") == "X"]
    steps = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e["name"].startswith("nanotronix step"))
    assert [name for *_, name in steps] == ["nanotronix step 3", "nanotronix step 4"]
    assert steps[0][1] <= steps[1][0]  # step 4 begins after step 3 ended
    names = [e["name"] for e in events]
    assert "aten::mm" in names and "c10d::allreduce_" in names  # the model's matmuls, DP2's gradient reduction

    summary = (out / "rank1_steps_3-4.txt").read_text().splitlines()
    assert re.fullmatch(r"profile of steps 3-4 \(rank 1\): \d+ ms of CPU time", summary[0]), summary[0]
    listed = {}
    for line in summary[1:-1]:  # "<share>%  <ms> ms  x<calls> <op>": the calls are the trace's events of that op
        share, _, _, calls, op = line.split(maxsplit=4)
        listed[op] = int(calls[1:])
    assert listed["aten::mm"] == names.count("aten::mm") > 0  # the top op on CPU
    for op in set(listed) & {"aten::addmm", "c10d::allreduce_"}:
        assert listed[op] == names.count(op), (op, listed[op], names.count(op))
    groups = dict(g.rsplit(" ", 1) for g in summary[-1].removeprefix("by group: ").split(", "))
    assert {"matmul", "communication", "attention"} <= set(groups)
    assert abs(sum(float(v.rstrip("%")) for v in groups.values()) - 100) < 0.5  # each share rounded to 0.1


def test_inductor_gemm_templates_count_as_matmuls():
    """Inductor names its kernels triton_<category[:3]>_<fused ops>_<n> (torch/_inductor/codegen/triton.py, the
    category from its own get_kernel_category_by_source_code): its GEMM templates (train.compile_mode:
    max-autotune-*) are matmuls in the profile's split, not fused elementwise work; pointwise and reduction
    kernels are, and a FlexAttention template is attention."""
    from torch._inductor.wrapper_benchmark import get_kernel_category_by_source_code

    from nanotronix.train.profiler import kernel_group

    def name(category: str, fused: str) -> str:
        kind = get_kernel_category_by_source_code(f"@triton_heuristics.{category}")[:3]
        return "_".join(["triton", kind, fused, "0"])

    expected = {name("template", "fused_mm"): "matmul", name("template", "fused_add_addmm"): "matmul",
                name("template", "fused_bmm"): "matmul", name("template", "fused_flex_attention"): "attention",
                name("pointwise", "fused_add_mul_silu"): "fused elementwise (triton)",
                name("reduction", "fused__to_copy_mean_pow_rsqrt"): "fused elementwise (triton)"}
    assert {n: kernel_group(n) for n in expected} == expected


def test_gpu_user_annotations_are_not_counted_as_kernel_time():
    """On CUDA, torch projects every record_function range onto the GPU timeline as a `gpu_user_annotation` row whose
    self device time is the range's whole span (Inductor's "## Call CompiledFxGraph ##" around each compiled graph,
    the optimizer's step): counted, a compiled step's kernels would count twice. torch's own table leaves them out
    (profiler_util: `not evt.is_user_annotation`); so does the summary. The rows below are key_averages() rows as
    torch makes them (FunctionEventAvg adopts is_user_annotation from its events)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent, FunctionEventAvg

    from nanotronix.train.profiler import own_times

    def row(name, device_time, device_type, annotation):
        event = FunctionEvent(id=0, name=name, thread=0, start_us=0, end_us=device_time, device_type=device_type,
                              is_user_annotation=annotation)
        avg = FunctionEventAvg()
        avg.add(event)
        avg.self_device_time_total = device_time
        return avg

    rows = [row("sm90_xmma_gemm_bf16", 700, DeviceType.CUDA, False),
            row("triton_poi_fused_add_mul_silu_0", 300, DeviceType.CUDA, False),
            row("## Call CompiledFxGraph abc ##", 1000, DeviceType.CUDA, True),
            row("aten::mm", 700, DeviceType.CPU, False)]
    prof = SimpleNamespace(key_averages=lambda: rows)
    assert [(name, t) for name, t, _ in own_times(prof, cuda=True)] == [("sm90_xmma_gemm_bf16", 700),
                                                                       ("triton_poi_fused_add_mul_silu_0", 300)]


def test_memory_snapshot_records_python_stacks_only(tmp_path, monkeypatch):
    """`logging.memory_snapshot` on CUDA, its torch.cuda calls recorded here (no GPU): the allocator's history is
    asked for Python frames only (torch's default, C++ frames too, is symbolized at the dump: minutes, and a crash on
    Inductor's generated code), bounded, dumped beside the trace when the window closes, then switched off."""
    import torch

    from nanotronix.train.profiler import StepProfiler

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append(("record", a, k)))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot",
                        lambda path: (calls.append(("dump", path)), open(path, "wb").close()))
    profiler = StepProfiler((2, 3), tmp_path, 0, torch.device("cuda"), memory=True)
    for step in (1, 2, 3):
        profiler.begin(step)
        torch.ones(4, 4) @ torch.ones(4, 4)
        profiler.end(step)
    assert calls[0] == ("record", (), {"max_entries": 1_000_000, "stacks": "python"}), calls
    assert calls[1][0] == "dump" and calls[2] == ("record", (), {"enabled": None}), calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0_steps_2-3.json.gz", "rank0_steps_2-3.txt",
                                                          "rank0_steps_2-3_memory.pickle"]
