"""Data-parallel gradients: fp32 flat buckets, reduction overlapped with backward, ZeRO-1 sharding.

Each parameter's gradient lives in `param.main_grad`, an fp32 view into its bucket's flat buffer, and each
parameter's data is a view into the bucket's flat parameter buffer (so ZeRO-1 can all-gather updated shards in one
call per bucket). `param.grad` *is* that view (set at the start of every step): the weights are fp32, so autograd's
gradient accumulation adds each micro-batch's gradient into the bucket in place, with no copy per micro-batch.
Should something have replaced `param.grad` (a `zero_grad()`, a gradient of another dtype), the post-accumulate-grad
hook adds it into `main_grad` and re-attaches the view. (With train.bf16_weight_cache the decoder linears' gradients
arrive through their bf16 copies instead: `compute_weights.py` adds them into `main_grad` and reports them with
`gradient_arrived`; `start`/`finish` arm and disarm those copies.) A parameter is complete after the step's last
micro-batch (each pipeline chunk runs backward once per micro-batch); when every parameter of a bucket is complete
the bucket's reduction starts asynchronously, while backward goes on for earlier layers. Buckets start in index
order on every rank (as torch DDP does), so NCCL sees the same collective order everywhere. Earlier micro-batches
trigger no communication at all.

  zero_stage 0: all-reduce of the bucket over DP; every rank then holds the full summed gradient.
  zero_stage 1: reduce-scatter; DP rank d holds the sum for its contiguous 1/dp shard of the bucket only (in that
                part of the bucket's own buffer), which is all the sharded optimizer
                (`optimizer.DistributedOptimizer`) needs. After the update the buckets
                are all-gathered over DP (`gather_weights`). With `parallel.overlap_param_gather` those gathers
                run in the background, in forward order, and each part of the model (embedding, decoder layer,
                final norm with the head) waits only for the buckets of its own weights, in a forward pre-hook,
                when the next step first runs it (Megatron's overlap_param_gather): the gather of later layers'
                weights overlaps the forward of earlier ones. Whatever else reads the weights between steps calls
                `wait_for_weights()` first (the checkpoint snapshot, the trainer at the end); `finish()` raises
                should a gather still be pending, which would mean a forward ran without its hook.

Gradients are sums: the loss is pre-scaled by 1/(micro-batches * dp), so the sum is the global-batch mean.
With parallel.grad_reduce_dtype bfloat16 a bucket's fp32 sum over the micro-batches is rounded to a bf16 copy when
its reduction starts, the collective sums those copies in bf16 (half the bytes on the wire: what limits a multi-node
run with few sequences per GPU, see tools/plan.py), and the result is copied back into the fp32 `shard_grad`; the
optimizer, clipping and the accumulation over micro-batches stay fp32.

Two kinds of parameter need a sum over another group first, and get buckets of their own that are reduced at
`finish()`, after backward (they are small, or there is only one):
  - sequence-parallel replicated parameters (the norms): each TP rank saw only its share of the tokens, so their
    gradients are summed over TP (Megatron does the same);
  - the tied embedding under pipeline parallelism: the first stage (lookup) and the last stage (head) each hold a
    part of its gradient, summed over `ctx.embedding_group`. Its bucket has the same layout on both stages, so
    the DP shards line up.
Hand-written rather than torch DDP because DDP has neither ZeRO-1 reduce-scatter nor per-parameter cross-group
sums, and its `no_sync` would need the trainer to know which micro-batch is last in a pipeline schedule.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from nanotronix.parallel.mappings import all_gather_flat, reduce_scatter_flat

ALIGN = 64  # elements: every parameter starts on a 256-byte boundary of the flat buffers


def weak_tensor_hook(method, *args):
    """A tensor hook calling `method(*args, tensor)` for as long as the method's object lives. Tensor hooks are kept
    in C++, where Python's garbage collector cannot see them: a hook holding its owner strongly while the owner
    holds the tensor is a cycle that is never freed (every model built in a process would keep its weights and
    buckets: the benchmark, which builds one model per run, ran later runs next to earlier runs' leftovers)."""
    ref = weakref.WeakMethod(method)

    def hook(tensor):
        bound = ref()
        if bound is not None:
            bound(*args, tensor)
    return hook


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class Bucket:
    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int  # padded: a multiple of ALIGN * dp
    pre_reduce_group: Optional[dist.ProcessGroup] = None  # summed over this group before the DP reduction
    deferred: bool = False  # reduced in finish() instead of during backward
    grad: torch.Tensor = field(default=None, repr=False)  # fp32 [numel]
    data: torch.Tensor = field(default=None, repr=False)  # parameter dtype [numel]
    shard_start: int = 0  # this DP rank's shard [shard_start, shard_end) of the bucket
    shard_end: int = 0
    shard_grad: torch.Tensor = field(default=None, repr=False)  # reduced gradient of the shard
    pending: int = 0
    handle: Optional[dist.Work] = None
    # parallel.grad_reduce_dtype bfloat16: the low-precision copies the reduction runs on, (whole bucket, reduced
    # result: itself, or this rank's shard under ZeRO-1), copied back into fp32 `shard_grad` once it is done
    low_precision: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)
    # Gradients received this step (over all params and micro-batches) when the reduction started; None: not yet.
    # Tests read it to check the overlap with backward and that no earlier micro-batch triggered a reduction.
    launched_after: Optional[int] = None
    gather: Optional[dist.Work] = None  # ZeRO-1: the pending all-gather of the updated weights into `data`
    # ZeRO-1 with bf16 twins (`compute_weights.py`): `data`'s version when the updated weights were gathered into
    # the twin in bf16 instead of into `data` in fp32; while `data` keeps that version, the twin holds the weights
    # and `data` is current in this rank's shard only. None: `data` holds them everywhere.
    twin_version: Optional[int] = None
    gather_input: Optional[torch.Tensor] = field(default=None, repr=False)  # its input, alive until it is waited
    # Model parts that had entered their forward when this bucket's last gather was waited (tests: the overlap).
    gather_waited_after: Optional[int] = None

    def pieces(self):
        """(param, offset, start, end) in bucket coordinates: each parameter's overlap [start, end) with this
        rank's shard; the parameter itself occupies [offset, offset + numel)."""
        for p, off in zip(self.params, self.offsets):
            lo, hi = max(off, self.shard_start), min(off + p.numel(), self.shard_end)
            if lo < hi:
                yield p, off, lo, hi


class GradBuffers:
    def __init__(self, model: nn.Module, ctx, zero_stage: int, bucket_size: int,
                 reduce_dtype: torch.dtype = torch.float32, own_buckets: Iterable[nn.Parameter] = ()):
        """own_buckets: parameters kept in buckets of their own, apart from the others (the decoder linears that
        get bf16 twins under ZeRO-1, so that their buckets can be gathered in bf16)."""
        self.ctx = ctx
        self.zero_stage = zero_stage
        self.reduce_dtype = reduce_dtype
        self.in_step = False  # between start() and finish()
        self.dp_group = ctx.dp_group if ctx.dp > 1 else None
        self.num_microbatches = 1
        self.overlap_param_gather = False  # set by install_weight_hooks
        self.parts_entered = 0  # model parts whose forward pre-hook ran this step (tests read it)
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = self._build_buckets(params, bucket_size, {id(p) for p in own_buckets})
        self._bucket_of: dict[int, Bucket] = {}
        self._arrivals: dict[int, int] = {}
        self._next_launch = 0
        # bf16 twins of the decoder weights used during a step (`compute_weights.py`, train.bf16_weight_cache)
        self.compute_weights = None
        for bucket in self.buckets:
            self._allocate(bucket)
            for p in bucket.params:
                self._bucket_of[id(p)] = bucket
                p.register_post_accumulate_grad_hook(weak_tensor_hook(self._on_grad))
        self.start(1)
        self.in_step = False

    # ---- layout

    def _build_buckets(self, params: list[nn.Parameter], bucket_size: int, apart: set[int]) -> list[Bucket]:
        """Reverse registration order (roughly the order backward produces gradients), special params apart; the
        `apart` ones fill regular buckets of their own, which come first (they complete during backward; the other
        stream ends with the embedding, the last gradient to arrive)."""
        ctx = self.ctx
        streams: dict[bool, list[list[nn.Parameter]]] = {True: [[]], False: [[]]}
        filled = {True: 0, False: 0}
        seq_parallel, tied = [], []
        for p in reversed(params):
            if getattr(p, "tied_across_stages", False):
                tied.append(p)
            elif getattr(p, "sequence_parallel", False):
                seq_parallel.append(p)
            else:
                own = id(p) in apart
                if filled[own] >= bucket_size:
                    streams[own].append([])
                    filled[own] = 0
                streams[own][-1].append(p)
                filled[own] += p.numel()
        specs = [(ps, None, False) for ps in streams[True] + streams[False] if ps]
        if seq_parallel:
            specs.append((seq_parallel, ctx.tp_group, True))
        if tied:
            specs.append((tied, ctx.embedding_group, True))
        buckets = []
        for i, (ps, group, deferred) in enumerate(specs):
            offsets, n = [], 0
            for p in ps:
                offsets.append(n)
                n = _round_up(n + p.numel(), ALIGN)
            buckets.append(Bucket(i, ps, offsets, _round_up(max(n, 1), ALIGN * self.ctx.dp), group, deferred))
        return buckets

    def _allocate(self, b: Bucket) -> None:
        first = b.params[0]
        b.grad = torch.zeros(b.numel, dtype=torch.float32, device=first.device)
        b.data = torch.zeros(b.numel, dtype=first.dtype, device=first.device)
        for p, off in zip(b.params, b.offsets):
            view = b.data[off:off + p.numel()].view_as(p)
            view.copy_(p.data)
            p.data = view
            p.main_grad = b.grad[off:off + p.numel()].view_as(p)
            p.grad = p.main_grad
        if self.zero_stage == 1 and self.ctx.dp > 1:
            size = b.numel // self.ctx.dp
            b.shard_start, b.shard_end = self.ctx.dp_rank * size, (self.ctx.dp_rank + 1) * size
            # the reduce-scatter writes this rank's sum over its own part of the bucket (in place, as Megatron's
            # distributed optimizer does; NCCL and gloo take an output at input + rank * size): no second fp32
            # buffer of 4/dp bytes per parameter, which tools/plan.py does not count
            b.shard_grad = b.grad[b.shard_start:b.shard_end]
        else:
            b.shard_start, b.shard_end = 0, b.numel
            b.shard_grad = b.grad

    def bucket_of(self, param: nn.Parameter) -> Bucket:
        return self._bucket_of[id(param)]

    # ---- ZeRO-1 weight all-gather

    def install_weight_hooks(self, parts: list[tuple[nn.Module, list[nn.Parameter]]]) -> None:
        """Turn on parallel.overlap_param_gather (ZeRO-1 over dp > 1): `parts` are (module, the weights its
        forward reads), covering every parameter; each module waits for its weights' buckets before its forward."""
        covered = {id(p) for _, params in parts for p in params}
        missing = [b.index for b in self.buckets for p in b.params if id(p) not in covered]
        if missing:
            raise RuntimeError(f"overlap_param_gather: parameters of buckets {sorted(set(missing))} belong to no "
                               "model part that waits for them")
        for module, params in parts:
            buckets = sorted({self._bucket_of[id(p)].index for p in params if id(p) in self._bucket_of})
            module.register_forward_pre_hook(functools.partial(_wait_for_weights_hook, self,
                                                               [self.buckets[i] for i in buckets]))
        self.overlap_param_gather = True

    def gather_weights(self) -> None:
        """ZeRO-1, after the update: all-gather each bucket's updated shard over DP. Launched in forward order
        (the deferred buckets, which hold weights of the first layers, then the regular ones last to first: they
        were filled in backward order), so the first layer's weights arrive first. A bucket whose weights the
        step reads from a bf16 twin is cast in its own shard and gathered into the twin: half the bytes, and the
        same bits as casting after an fp32 gather. Waits for all of them unless overlap_param_gather is on."""
        regular = [b for b in self.buckets if not b.deferred]
        for b in [b for b in self.buckets if b.deferred] + regular[::-1]:
            twin = self.compute_weights.twin_of(b) if self.compute_weights is not None else None
            target = b.data if twin is None else twin
            if twin is not None:
                twin[b.shard_start:b.shard_end].copy_(b.data[b.shard_start:b.shard_end])
                b.twin_version = b.data._version
            # in place: this rank's shard is the input, at its own place in the output (NCCL and gloo take an
            # input at output + rank * size, as Megatron's distributed optimizer gathers): no copy of the shard
            b.gather_input = target[b.shard_start:b.shard_end]
            b.gather = all_gather_flat(target, b.gather_input, group=self.dp_group, async_op=True)
        if not self.overlap_param_gather:
            self.weights_ready(self.buckets, fp32=False)  # the step reads the twins: no fp32 gather for them

    def twin_holds_weights(self, b: Bucket) -> bool:
        """Whether bucket `b`'s weights are in its bf16 twin only (see `Bucket.twin_version`). A write to `data`
        since that gather (a checkpoint load, which writes every weight on every rank) makes `data` the truth again."""
        if b.twin_version is not None and b.data._version != b.twin_version:
            b.twin_version = None
        return b.twin_version is not None

    def weights_ready(self, buckets: Iterable[Bucket], fp32: bool) -> None:
        """Wait for these buckets' weight gathers (no-op when done) and refresh their bf16 copies if stale. With
        `fp32` (whoever reads the fp32 weights: a checkpoint, the end of training, a forward outside a training
        step) a bucket gathered in bf16 gets its fp32 weights gathered too; every rank reads at the same points."""
        for b in buckets:
            if b.gather is not None:
                b.gather.wait()
                b.gather, b.gather_input = None, None
                b.gather_waited_after = self.parts_entered
            if fp32 and self.twin_holds_weights(b):
                all_gather_flat(b.data, b.data[b.shard_start:b.shard_end], group=self.dp_group)  # in place
                b.twin_version = None
            if self.compute_weights is not None:
                self.compute_weights.refresh(b.index)

    def wait_for_weights(self) -> None:
        """Every weight up to date: call before reading parameters outside the model's forward (checkpoints)."""
        self.weights_ready(self.buckets, fp32=True)

    def gathers_pending(self) -> int:
        return sum(b.gather is not None for b in self.buckets)

    # ---- per step

    def start(self, num_microbatches: int) -> None:
        """Zero the gradients before a step whose every chunk runs `num_microbatches` backward passes."""
        self.num_microbatches = num_microbatches
        self._next_launch = 0
        self.grads_received = 0
        self.copied_grads = 0  # gradients that arrived outside the bucket this step (tests expect none)
        self.parts_entered = 0
        for b in self.buckets:
            b.grad.zero_()
            for p in b.params:
                p.grad = p.main_grad
            b.pending = len(b.params)
            b.handle, b.launched_after = None, None
        self._arrivals = {id(p): 0 for b in self.buckets for p in b.params}
        self.in_step = True
        if self.compute_weights is not None:
            self.compute_weights.arm()

    def _on_grad(self, p: nn.Parameter) -> None:
        if p.grad.data_ptr() != p.main_grad.data_ptr():  # not accumulated in place (see the docstring)
            p.main_grad.add_(p.grad)
            p.grad = p.main_grad
            self.copied_grads += 1
        self.gradient_arrived(p)

    def gradient_arrived(self, p: nn.Parameter) -> None:
        """One micro-batch's gradient of `p` is in `p.main_grad`; start bucket reductions that became ready."""
        self.grads_received += 1
        count = self._arrivals[id(p)] + 1
        self._arrivals[id(p)] = count
        if count > self.num_microbatches:
            raise RuntimeError(f"a parameter received {count} gradients in a step of {self.num_microbatches} "
                               "micro-batches (backward ran more often than the schedule says)")
        if count == self.num_microbatches:
            bucket = self._bucket_of[id(p)]
            bucket.pending -= 1
            if bucket.pending == 0 and not bucket.deferred:
                self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            b = self.buckets[self._next_launch]
            if b.deferred or b.pending:
                return
            b.handle = self._reduce(b, async_op=True)
            b.launched_after = self.grads_received
            self._next_launch += 1

    def _reduce(self, b: Bucket, async_op: bool) -> Optional[dist.Work]:
        if self.dp_group is None:
            return None
        grad, result = b.grad, b.shard_grad
        if self.reduce_dtype != torch.float32:
            grad = b.grad.to(self.reduce_dtype)
            result = grad if self.zero_stage == 0 else \
                torch.empty(b.shard_end - b.shard_start, dtype=self.reduce_dtype, device=grad.device)
            b.low_precision = (grad, result)
        if self.zero_stage == 1:
            return reduce_scatter_flat(result, grad, group=self.dp_group, async_op=async_op)
        return dist.all_reduce(grad, group=self.dp_group, async_op=async_op)

    def _reduced(self, b: Bucket) -> None:
        """After the bucket's reduction has finished: a low-precision result back into the fp32 `shard_grad`."""
        if b.low_precision is not None:
            b.shard_grad.copy_(b.low_precision[1])
            b.low_precision = None

    def finish(self) -> None:
        """Wait for every reduction; afterwards `shard_grad` of each bucket holds the summed gradient."""
        self.in_step = False
        if self.compute_weights is not None:
            self.compute_weights.disarm()
        if self.gathers_pending():
            raise RuntimeError(f"{self.gathers_pending()} weight all-gather(s) still pending after backward: a model "
                               "part ran its forward without waiting for its weights (overlap_param_gather)")
        for b in self.buckets:
            if b.pending:
                missing = sum(1 for p in b.params if self._arrivals[id(p)] != self.num_microbatches)
                raise RuntimeError(f"{missing} parameter(s) of gradient bucket {b.index} did not receive "
                                   f"{self.num_microbatches} gradients this step (unused parameters?)")
        for b in self.buckets:
            if b.deferred:
                if b.pre_reduce_group is not None and dist.get_world_size(b.pre_reduce_group) > 1:
                    dist.all_reduce(b.grad, group=b.pre_reduce_group)
                self._reduce(b, async_op=False)
                b.launched_after = self.grads_received
            elif b.handle is not None:
                b.handle.wait()
            self._reduced(b)


@torch.compiler.disable  # waiting on a collective is not traceable; the compiled layer's graph starts after it
def _wait_for_weights_hook(grads: GradBuffers, buckets: list[Bucket], module: nn.Module, args) -> None:
    grads.parts_entered += 1
    grads.weights_ready(buckets, fp32=not grads.in_step)
