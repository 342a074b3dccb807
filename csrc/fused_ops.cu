// Fused CUDA kernels for the Llama block: residual add + RMSNorm, RoPE applied while splitting the fused QKV
// projection, and SwiGLU on the pairwise-interleaved gate/up projection (forward and backward of each).
//
// Why hand-written: eager PyTorch runs each of these as several elementwise kernels with fp32 temporaries
// (norm: cast, square, mean, rsqrt, two muls; RoPE: slice, neg, cat, two muls, add; SwiGLU: silu, mul), so
// every activation crosses device memory many times; one pass each is the floor. torch.compile reaches the
// same floor through Inductor, so these kernels serve the eager path (train.fused_kernels).
//
// This file includes only CUDA headers (no torch), so nvcc builds it in seconds; csrc/bindings.cpp does the
// tensor checks and calls the launchers below. All math is fp32; inputs and outputs are fp32 or bf16.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats.
__device__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// residual add + RMSNorm. One block per row; the row is kept in shared memory between the two passes.
// res = x (+ delta); rstd = 1/sqrt(mean(res^2) + eps); out = w * res * rstd.

template <typename TX, typename TD, typename TR, typename TO>
__global__ void add_rmsnorm_fwd_kernel(const TX* __restrict__ x, const TD* __restrict__ delta,
                                       const float* __restrict__ w, TR* __restrict__ res, TO* __restrict__ out,
                                       float* __restrict__ rstd_out, int64_t cols, float eps) {
  extern __shared__ float smem[];  // cols floats, then 32 for the reduction
  float* row = smem;
  float* scratch = smem + cols;
  const int64_t base = (int64_t)blockIdx.x * cols;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    float h = to_f(x[base + j]);
    if (delta != nullptr) h += to_f(delta[base + j]);
    // round the residual to its storage dtype first, so the norm sees what the next layer will see
    const TR hr = from_f<TR>(h);
    if (res != nullptr) res[base + j] = hr;
    h = to_f(hr);
    row[j] = h;
    ss += h * h;
  }
  ss = block_sum(ss, scratch);
  const float rstd = rsqrtf(ss / (float)cols + eps);
  if (threadIdx.x == 0) rstd_out[blockIdx.x] = rstd;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) out[base + j] = from_f<TO>(w[j] * (row[j] * rstd));
}

// Backward. A fixed grid walks the rows; each block accumulates d(w) for its rows in shared memory and writes
// one partial row (summed over blocks by the caller: no atomics, deterministic).
// gh = rstd * (g*w - xhat * mean(g*w*xhat)) (+ g_res); gx = gh, gdelta = gh.
template <typename TX, typename TD, typename TR, typename TO>
__global__ void add_rmsnorm_bwd_kernel(const TO* __restrict__ g, const TR* __restrict__ g_res,
                                       const TR* __restrict__ res, const float* __restrict__ rstd,
                                       const float* __restrict__ w, TX* __restrict__ gx, TD* __restrict__ gdelta,
                                       float* __restrict__ gw_partial, int64_t rows, int64_t cols) {
  extern __shared__ float smem[];  // gw acc [cols], g*w [cols], xhat [cols], scratch [32]
  float* gw_acc = smem;
  float* gwv = smem + cols;
  float* xhat = smem + 2 * cols;
  float* scratch = smem + 3 * cols;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) gw_acc[j] = 0.f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t base = r * cols;
    const float rs = rstd[r];
    float dot = 0.f;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float gj = to_f(g[base + j]);
      const float xh = to_f(res[base + j]) * rs;
      const float gwj = gj * w[j];
      gw_acc[j] += gj * xh;
      gwv[j] = gwj;
      xhat[j] = xh;
      dot += gwj * xh;
    }
    dot = block_sum(dot, scratch) / (float)cols;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      float gh = rs * (gwv[j] - xhat[j] * dot);
      if (g_res != nullptr) gh += to_f(g_res[base + j]);
      gx[base + j] = from_f<TX>(gh);
      if (gdelta != nullptr) gdelta[base + j] = from_f<TD>(gh);
    }
  }
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) gw_partial[(int64_t)blockIdx.x * cols + j] = gw_acc[j];
}

// ---------------------------------------------------------------------------------------------------------
// RoPE (rotate-half layout) fused with the QKV split. qkv: [tokens, groups, r + 2, D] (contiguous; token =
// b * S + s), slots 0..r-1 are the group's query heads, r its key, r+1 its value. Writes q [tokens, groups*r, D],
// k and v [tokens, groups, D]. One thread per (token, group, slot, i < D/2): it owns channels i and i + D/2.

template <typename T>
__global__ void rope_qkv_fwd_kernel(const T* __restrict__ qkv, const float* __restrict__ cos,
                                    const float* __restrict__ sin, T* __restrict__ q, T* __restrict__ k,
                                    T* __restrict__ v, int64_t tokens, int64_t seq, int groups, int r, int dim) {
  const int half = dim / 2, slots = r + 2;
  const int64_t total = tokens * groups * slots * half;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int i = idx % half;
    int64_t t = idx / half;
    const int slot = t % slots;
    t /= slots;
    const int grp = t % groups;
    const int64_t tok = t / groups;
    const int64_t src = ((tok * groups + grp) * slots + slot) * dim;
    const float x1 = to_f(qkv[src + i]), x2 = to_f(qkv[src + i + half]);
    T* dst;
    if (slot < r) dst = q + ((tok * groups + grp) * r + slot) * dim;
    else if (slot == r) dst = k + (tok * groups + grp) * dim;
    else {
      dst = v + (tok * groups + grp) * dim;
      dst[i] = qkv[src + i];
      dst[i + half] = qkv[src + i + half];
      continue;
    }
    const int64_t p = (tok % seq) * dim;
    dst[i] = from_f<T>(x1 * cos[p + i] - x2 * sin[p + i]);
    dst[i + half] = from_f<T>(x2 * cos[p + i + half] + x1 * sin[p + i + half]);
  }
}

template <typename T>
__global__ void rope_qkv_bwd_kernel(const T* __restrict__ gq, const T* __restrict__ gk, const T* __restrict__ gv,
                                    const float* __restrict__ cos, const float* __restrict__ sin,
                                    T* __restrict__ gqkv, int64_t tokens, int64_t seq, int groups, int r,
                                    int dim) {
  const int half = dim / 2, slots = r + 2;
  const int64_t total = tokens * groups * slots * half;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int i = idx % half;
    int64_t t = idx / half;
    const int slot = t % slots;
    t /= slots;
    const int grp = t % groups;
    const int64_t tok = t / groups;
    T* dst = gqkv + ((tok * groups + grp) * slots + slot) * dim;
    const T* src;
    if (slot < r) src = gq + ((tok * groups + grp) * r + slot) * dim;
    else if (slot == r) src = gk + (tok * groups + grp) * dim;
    else {
      src = gv + (tok * groups + grp) * dim;
      dst[i] = src[i];
      dst[i + half] = src[i + half];
      continue;
    }
    const int64_t p = (tok % seq) * dim;
    const float g1 = to_f(src[i]), g2 = to_f(src[i + half]);
    dst[i] = from_f<T>(g1 * cos[p + i] + g2 * sin[p + i + half]);
    dst[i + half] = from_f<T>(g2 * cos[p + i + half] - g1 * sin[p + i]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// SwiGLU on interleaved pairs: gu [n, 2] -> out [n] = silu(gu[:, 0]) * gu[:, 1]. One thread per pair.

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gu, T* __restrict__ out, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = to_f(gu[2 * i]), u = to_f(gu[2 * i + 1]);
    out[i] = from_f<T>(g / (1.f + __expf(-g)) * u);
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ go, const T* __restrict__ gu, T* __restrict__ ggu,
                                  int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = to_f(gu[2 * i]), u = to_f(gu[2 * i + 1]), o = to_f(go[i]);
    const float sig = 1.f / (1.f + __expf(-g));
    const float silu = g * sig;
    ggu[2 * i] = from_f<T>(o * u * sig * (1.f + g * (1.f - sig)));
    ggu[2 * i + 1] = from_f<T>(o * silu);
  }
}

int grid_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = 132 * 32;  // enough blocks to fill an H100 many times over; grid-stride loops do the rest
  return (int)(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// launchers (dtype codes: 0 = float32, 1 = bfloat16); each returns the launch's cudaError_t.

#define NTX_DISPATCH1(code, T, ...)                          \
  if ((code) == 0) { using T = float; __VA_ARGS__; }          \
  else { using T = __nv_bfloat16; __VA_ARGS__; }

int ntx_add_rmsnorm_fwd(int tx, int td, int to, const void* x, const void* delta, const float* w, void* res,
                        void* out, float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  const int threads = cols >= 1024 ? 256 : 128;
  const size_t smem = (cols + 32) * sizeof(float);
  NTX_DISPATCH1(tx, TX, NTX_DISPATCH1(td, TD, NTX_DISPATCH1(to, TO, {
    // the residual has the promoted dtype of x and delta (fp32 if either is)
    if (tx == 0 || (delta != nullptr && td == 0)) {
      add_rmsnorm_fwd_kernel<TX, TD, float, TO><<<rows, threads, smem, stream>>>(
          (const TX*)x, (const TD*)delta, w, (float*)res, (TO*)out, rstd, cols, eps);
    } else {
      add_rmsnorm_fwd_kernel<TX, TD, __nv_bfloat16, TO><<<rows, threads, smem, stream>>>(
          (const TX*)x, (const TD*)delta, w, (__nv_bfloat16*)res, (TO*)out, rstd, cols, eps);
    }
  })))
  return (int)cudaGetLastError();
}

int ntx_add_rmsnorm_bwd(int tx, int td, int tr, int to, const void* g, const void* g_res, const void* res,
                        const float* rstd, const float* w, void* gx, void* gdelta, float* gw_partial,
                        int64_t rows, int64_t cols, int blocks, cudaStream_t stream) {
  const int threads = cols >= 1024 ? 256 : 128;
  const size_t smem = (3 * cols + 32) * sizeof(float);
  NTX_DISPATCH1(tx, TX, NTX_DISPATCH1(td, TD, NTX_DISPATCH1(tr, TR, NTX_DISPATCH1(to, TO, {
    add_rmsnorm_bwd_kernel<TX, TD, TR, TO><<<blocks, threads, smem, stream>>>(
        (const TO*)g, (const TR*)g_res, (const TR*)res, rstd, w, (TX*)gx, (TD*)gdelta, gw_partial, rows, cols);
  }))))
  return (int)cudaGetLastError();
}

int ntx_rope_qkv_fwd(int dt, const void* qkv, const float* cos, const float* sin, void* q, void* k, void* v,
                     int64_t tokens, int64_t seq, int groups, int r, int dim, cudaStream_t stream) {
  const int threads = 256;
  const int blocks = grid_for(tokens * groups * (r + 2) * (dim / 2), threads);
  NTX_DISPATCH1(dt, T, {
    rope_qkv_fwd_kernel<T><<<blocks, threads, 0, stream>>>((const T*)qkv, cos, sin, (T*)q, (T*)k, (T*)v, tokens,
                                                           seq, groups, r, dim);
  })
  return (int)cudaGetLastError();
}

int ntx_rope_qkv_bwd(int dt, const void* gq, const void* gk, const void* gv, const float* cos, const float* sin,
                     void* gqkv, int64_t tokens, int64_t seq, int groups, int r, int dim, cudaStream_t stream) {
  const int threads = 256;
  const int blocks = grid_for(tokens * groups * (r + 2) * (dim / 2), threads);
  NTX_DISPATCH1(dt, T, {
    rope_qkv_bwd_kernel<T><<<blocks, threads, 0, stream>>>((const T*)gq, (const T*)gk, (const T*)gv, cos, sin,
                                                           (T*)gqkv, tokens, seq, groups, r, dim);
  })
  return (int)cudaGetLastError();
}

int ntx_swiglu_fwd(int dt, const void* gu, void* out, int64_t n, cudaStream_t stream) {
  const int threads = 256;
  NTX_DISPATCH1(dt, T, {
    swiglu_fwd_kernel<T><<<grid_for(n, threads), threads, 0, stream>>>((const T*)gu, (T*)out, n);
  })
  return (int)cudaGetLastError();
}

int ntx_swiglu_bwd(int dt, const void* go, const void* gu, void* ggu, int64_t n, cudaStream_t stream) {
  const int threads = 256;
  NTX_DISPATCH1(dt, T, {
    swiglu_bwd_kernel<T><<<grid_for(n, threads), threads, 0, stream>>>((const T*)go, (const T*)gu, (T*)ggu, n);
  })
  return (int)cudaGetLastError();
}
