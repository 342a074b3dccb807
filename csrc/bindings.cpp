// Tensor-level entry points of nanotronix._kernels: check shapes/dtypes/devices, allocate outputs, call the
// launchers of fused_ops.cu on the current CUDA stream. The autograd wiring and the pure-PyTorch twins live in
// nanotronix/kernels/; this file only moves tensors to raw pointers.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

int ntx_add_rmsnorm_fwd(int tx, int td, int to, const void* x, const void* delta, const float* w, void* res,
                        void* out, float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream);
int ntx_add_rmsnorm_bwd(int tx, int td, int tr, int to, const void* g, const void* g_res, const void* res,
                        const float* rstd, const float* w, void* gx, void* gdelta, float* gw_partial,
                        int64_t rows, int64_t cols, int blocks, cudaStream_t stream);
int ntx_rope_qkv_fwd(int dt, const void* qkv, const float* cos, const float* sin, void* q, void* k, void* v,
                     int64_t tokens, int64_t seq, int groups, int r, int dim, cudaStream_t stream);
int ntx_rope_qkv_bwd(int dt, const void* gq, const void* gk, const void* gv, const float* cos, const float* sin,
                     void* gqkv, int64_t tokens, int64_t seq, int groups, int r, int dim, cudaStream_t stream);
int ntx_swiglu_fwd(int dt, const void* gu, void* out, int64_t n, cudaStream_t stream);
int ntx_swiglu_bwd(int dt, const void* go, const void* gu, void* ggu, int64_t n, cudaStream_t stream);

namespace {

int code(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "nanotronix._kernels: only float32 and bfloat16 are supported, got ", t.scalar_type());
  return t.scalar_type() == at::kFloat ? 0 : 1;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "nanotronix._kernels: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "nanotronix._kernels: ", name, " must be contiguous");
}

void check_launch(int err) {
  TORCH_CHECK(err == 0, "nanotronix._kernels: kernel launch failed: ", cudaGetErrorString((cudaError_t)err));
}

at::ScalarType promote(const at::Tensor& x, const c10::optional<at::Tensor>& delta) {
  return delta.has_value() ? at::promote_types(x.scalar_type(), delta->scalar_type()) : x.scalar_type();
}

// x, delta: [rows, cols]; w: [cols] fp32. Returns (out [rows, cols] in out_dtype, residual (x + delta, or an
// empty tensor when delta is None: the residual is x itself), rstd [rows] fp32).
std::vector<at::Tensor> add_rmsnorm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                        const at::Tensor& w, double eps, at::ScalarType out_dtype) {
  check_cuda(x, "x");
  check_cuda(w, "weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == at::kFloat,
              "add_rmsnorm_fwd: expected x [rows, cols] and an fp32 weight [cols]");
  if (delta.has_value()) {
    check_cuda(*delta, "delta");
    TORCH_CHECK(delta->sizes() == x.sizes(), "add_rmsnorm_fwd: delta must have the shape of x");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  auto out = at::empty({rows, cols}, x.options().dtype(out_dtype));
  auto res = delta.has_value() ? at::empty({rows, cols}, x.options().dtype(promote(x, delta))) : at::Tensor();
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, res, rstd};
  check_launch(ntx_add_rmsnorm_fwd(code(x), delta.has_value() ? code(*delta) : 0, code(out), x.data_ptr(),
                                   delta.has_value() ? delta->data_ptr() : nullptr, w.data_ptr<float>(),
                                   delta.has_value() ? res.data_ptr() : nullptr, out.data_ptr(),
                                   rstd.data_ptr<float>(), rows, cols, (float)eps,
                                   c10::cuda::getCurrentCUDAStream().stream()));
  return {out, res, rstd};
}

// g: grad of out; g_res: grad of the residual output (or None); res: the residual (x when there was no delta).
// Returns (grad x in x_dtype, grad delta in delta_dtype or an empty tensor, grad weight fp32 [cols]).
std::vector<at::Tensor> add_rmsnorm_bwd(const at::Tensor& g, const c10::optional<at::Tensor>& g_res,
                                        const at::Tensor& res, const at::Tensor& rstd, const at::Tensor& w,
                                        at::ScalarType x_dtype, c10::optional<at::ScalarType> delta_dtype) {
  check_cuda(g, "grad");
  check_cuda(res, "residual");
  check_cuda(rstd, "rstd");
  TORCH_CHECK(g.sizes() == res.sizes() && g.dim() == 2, "add_rmsnorm_bwd: grad and residual shapes differ");
  if (g_res.has_value()) {
    check_cuda(*g_res, "residual grad");
    TORCH_CHECK(g_res->sizes() == res.sizes() && g_res->scalar_type() == res.scalar_type(),
                "add_rmsnorm_bwd: the residual grad must match the residual");
  }
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t rows = g.size(0), cols = g.size(1);
  auto gx = at::empty({rows, cols}, g.options().dtype(x_dtype));
  auto gd = delta_dtype.has_value() ? at::empty({rows, cols}, g.options().dtype(*delta_dtype)) : at::Tensor();
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, g.get_device()) == cudaSuccess,
              "add_rmsnorm_bwd: cannot read the multiprocessor count");
  const int blocks = (int)std::max<int64_t>(1, std::min<int64_t>(rows, 2 * sms));
  auto partial = at::empty({blocks, cols}, g.options().dtype(at::kFloat));
  if (rows == 0) return {gx, gd, at::zeros({cols}, g.options().dtype(at::kFloat))};
  check_launch(ntx_add_rmsnorm_bwd(code(gx), gd.defined() ? code(gd) : 0, code(res), code(g), g.data_ptr(),
                                   g_res.has_value() ? g_res->data_ptr() : nullptr, res.data_ptr(),
                                   rstd.data_ptr<float>(), w.data_ptr<float>(), gx.data_ptr(),
                                   gd.defined() ? gd.data_ptr() : nullptr, partial.data_ptr<float>(), rows, cols,
                                   blocks, c10::cuda::getCurrentCUDAStream().stream()));
  return {gx, gd, partial.sum(0)};
}

// qkv: [B, S, groups, r + 2, D] contiguous; cos/sin: [S, D] fp32. Returns q [B, S, groups*r, D], k, v [B, S, groups, D].
std::vector<at::Tensor> rope_qkv_fwd(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin) {
  check_cuda(qkv, "qkv");
  check_cuda(cos, "cos");
  check_cuda(sin, "sin");
  TORCH_CHECK(qkv.dim() == 5 && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope_qkv_fwd: expected qkv [B, S, groups, r+2, D] and fp32 cos/sin");
  const int64_t b = qkv.size(0), s = qkv.size(1), groups = qkv.size(2), r = qkv.size(3) - 2, d = qkv.size(4);
  TORCH_CHECK(cos.size(0) == s && cos.size(1) == d && sin.sizes() == cos.sizes() && d % 2 == 0,
              "rope_qkv_fwd: cos/sin must be [S, D] with an even D");
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto q = at::empty({b, s, groups * r, d}, qkv.options());
  auto k = at::empty({b, s, groups, d}, qkv.options());
  auto v = at::empty({b, s, groups, d}, qkv.options());
  if (qkv.numel() == 0) return {q, k, v};
  check_launch(ntx_rope_qkv_fwd(code(qkv), qkv.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                q.data_ptr(), k.data_ptr(), v.data_ptr(), b * s, s, (int)groups, (int)r, (int)d,
                                c10::cuda::getCurrentCUDAStream().stream()));
  return {q, k, v};
}

at::Tensor rope_qkv_bwd(const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& gv, const at::Tensor& cos,
                        const at::Tensor& sin) {
  check_cuda(gq, "grad q");
  check_cuda(gk, "grad k");
  check_cuda(gv, "grad v");
  TORCH_CHECK(gq.dim() == 4 && gk.sizes() == gv.sizes() && gq.scalar_type() == gk.scalar_type() &&
              gk.scalar_type() == gv.scalar_type(), "rope_qkv_bwd: grads of q, k, v do not match");
  const int64_t b = gq.size(0), s = gq.size(1), groups = gk.size(2), d = gq.size(3);
  const int64_t r = gq.size(2) / groups;
  const c10::cuda::CUDAGuard guard(gq.device());
  auto gqkv = at::empty({b, s, groups, r + 2, d}, gq.options());
  if (gqkv.numel() == 0) return gqkv;
  check_launch(ntx_rope_qkv_bwd(code(gq), gq.data_ptr(), gk.data_ptr(), gv.data_ptr(), cos.data_ptr<float>(),
                                sin.data_ptr<float>(), gqkv.data_ptr(), b * s, s, (int)groups, (int)r, (int)d,
                                c10::cuda::getCurrentCUDAStream().stream()));
  return gqkv;
}

// gate_up: [..., 2F] with gate/up interleaved pairwise. Returns [..., F].
at::Tensor swiglu_fwd(const at::Tensor& gate_up) {
  check_cuda(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "swiglu_fwd: the last dim must be even");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  auto sizes = gate_up.sizes().vec();
  sizes.back() /= 2;
  auto out = at::empty(sizes, gate_up.options());
  if (out.numel() == 0) return out;
  check_launch(ntx_swiglu_fwd(code(gate_up), gate_up.data_ptr(), out.data_ptr(), out.numel(),
                              c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& gate_up) {
  check_cuda(grad_out, "grad");
  check_cuda(gate_up, "gate_up");
  TORCH_CHECK(grad_out.numel() * 2 == gate_up.numel() && grad_out.scalar_type() == gate_up.scalar_type(),
              "swiglu_bwd: grad and gate_up do not match");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  auto ggu = at::empty_like(gate_up);
  if (ggu.numel() == 0) return ggu;
  check_launch(ntx_swiglu_bwd(code(gate_up), grad_out.data_ptr(), gate_up.data_ptr(), ggu.data_ptr(),
                              grad_out.numel(), c10::cuda::getCurrentCUDAStream().stream()));
  return ggu;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nanotronix fused CUDA kernels (add+RMSNorm, RoPE+QKV split, SwiGLU); see nanotronix/kernels";
  m.def("add_rmsnorm_fwd", &add_rmsnorm_fwd);
  m.def("add_rmsnorm_bwd", &add_rmsnorm_bwd);
  m.def("rope_qkv_fwd", &rope_qkv_fwd);
  m.def("rope_qkv_bwd", &rope_qkv_bwd);
  m.def("swiglu_fwd", &swiglu_fwd);
  m.def("swiglu_bwd", &swiglu_bwd);
}
