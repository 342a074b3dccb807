#!/usr/bin/env bash
# Every GPU check and benchmark of nanotronix in one short run (made for a lent H100; ~7 minutes there):
#   environment, csrc/ kernel build (sm_90), GPU tests (kernel numerics vs the PyTorch twins and fp64, the bf16
#   weight cache and the compiled loss on CUDA) -> $OUT/checks.log
#   tools/bench_train.py: SmolLM2-1.7B / 360M / 135M at seq 2048 vs transformers -> $OUT/bench_*.{log,json}
#   last, the CPU layout tests under this machine's torch -> $OUT/checks.log
# Usage: OUT=/some/dir bash tools/gpu_checks.sh   (OUT defaults to ./gpu_out)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8

{
  date -u; nvidia-smi; uname -a; nvcc --version | tail -1
  $PY -c "import torch, triton, transformers, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))"
} > "$OUT/checks.log" 2>&1
tail -3 "$OUT/checks.log"

echo "== build csrc kernels"
start=$(date +%s)
timeout 240 $PY setup.py build_ext --inplace >> "$OUT/checks.log" 2>&1; echo "build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/checks.log"
$PY -c "from nanotronix import accel; print('kernels loaded:', accel.compiled_kernels() is not None)" 2>&1 | tee -a "$OUT/checks.log"

echo "== GPU tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_kernels.py \
  tests/test_compute_weights.py tests/test_speedups.py -k "cuda or kernels" \
  >> "$OUT/checks.log" 2>&1; echo "tests rc=$?"; tail -5 "$OUT/checks.log"

bench() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  echo "== bench $name"
  timeout "$limit" $PY tools/bench_train.py "$@" --json "$OUT/bench_$name.json" > "$OUT/bench_$name.log" 2>&1
  echo "bench $name rc=$?"; grep -A12 "^run " "$OUT/bench_$name.log" || tail -5 "$OUT/bench_$name.log"
}
S=train.seq_len=2048
# The headline figure: accumulation 16 (SmolLM2-1.7B's 1M-token batch is 4 x 16 x 16 GPUs), compiled, with and
# without the bf16 weight cache, with document masking (random tokens: the mask is built and applied, the cost of
# the masked SDPA kernel is what shows), and at micro-batch 8 (fits in 80 GB without recompute?); one step of
# compiled-cache is profiled (kernel-time breakdown in the log: what to work on next).
C=train.compile=true,train.loss_chunk_size=4096
bench 1p7b 420 model.preset=smollm2-1.7b $S train.micro_batch_size=4 --accum 16 --warmup 2 --steps 3 \
  --variant compiled:$C \
  --variant compiled-cache:$C,train.bf16_weight_cache=true \
  --variant compiled-cache-docmask:$C,train.bf16_weight_cache=true,model.document_mask_eos_id=0 \
  --variant compiled-cache-mb8:$C,train.bf16_weight_cache=true,train.micro_batch_size=8 --profile compiled-cache
bench 360m 120 model.preset=smollm2-360m $S train.micro_batch_size=8 --accum 2 --warmup 2 --steps 4 \
  --variant eager-fused:train.fused_kernels=true,train.loss_chunk_size=4096,train.bf16_weight_cache=true \
  --variant compiled:$C --variant compiled-cache:$C,train.bf16_weight_cache=true
bench 135m 120 model.preset=smollm2-135m $S train.micro_batch_size=16 --accum 2 --warmup 2 --steps 4 \
  --variant compiled:$C --variant compiled-cache:$C,train.bf16_weight_cache=true
echo "== this machine's torch on CPU: document ids between pipeline stages, every layout (gloo), the bf16 weight cache, ZeRO-1 gather overlap"
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_parallel_layouts.py tests/test_document_masking.py tests/test_compute_weights.py -k "not cuda" \
  >> "$OUT/checks.log" 2>&1; echo "layout tests rc=$?"; tail -2 "$OUT/checks.log"

echo "== done"; date -u
