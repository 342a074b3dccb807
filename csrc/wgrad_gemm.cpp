// nanotronix._wgrad_gemm: a linear layer's weight gradient accumulated into its fp32 gradient buffer by the GEMM
// itself (train.grad_accumulation_fusion; nanotronix/parallel/grad_accumulation_fusion.py).
//
// main_grad [out, in] (fp32) += grad_out[tokens, out]^T @ input[tokens, in] (both bf16), as one cuBLAS GEMM with
// bf16 A/B, an fp32 C read and written in place (beta = 1) and fp32 accumulation: the gradient never exists as a
// bf16 tensor and needs no separate add. A module of its own (built with optional=True by setup.py) because it
// links cuBLAS: if that fails on some machine, the fused kernels of nanotronix._kernels still build.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

namespace {

void check_cublas(cublasStatus_t status) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "nanotronix._wgrad_gemm: cuBLAS error ", static_cast<int>(status));
}

void wgrad_accumulate_fp32(at::Tensor& main_grad, const at::Tensor& grad_out, const at::Tensor& input) {
  TORCH_CHECK(main_grad.is_cuda() && grad_out.is_cuda() && input.is_cuda(),
              "wgrad_accumulate_fp32: every tensor must be on CUDA");
  TORCH_CHECK(main_grad.get_device() == grad_out.get_device() && main_grad.get_device() == input.get_device(),
              "wgrad_accumulate_fp32: the tensors are on different devices");
  TORCH_CHECK(main_grad.scalar_type() == at::kFloat && main_grad.dim() == 2 && main_grad.is_contiguous(),
              "wgrad_accumulate_fp32: main_grad must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(grad_out.scalar_type() == at::kBFloat16 && input.scalar_type() == at::kBFloat16,
              "wgrad_accumulate_fp32: grad_out and input must be bfloat16");
  TORCH_CHECK(grad_out.dim() == 2 && input.dim() == 2 && grad_out.size(0) == input.size(0) &&
                  grad_out.size(1) == main_grad.size(0) && input.size(1) == main_grad.size(1),
              "wgrad_accumulate_fp32: expected main_grad [out, in], grad_out [tokens, out], input [tokens, in]");
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor x = input.contiguous();
  const int64_t tokens = x.size(0), out = g.size(1), in = x.size(1);
  if (tokens == 0 || out == 0 || in == 0) return;
  TORCH_CHECK(tokens <= INT_MAX && out <= INT_MAX && in <= INT_MAX, "wgrad_accumulate_fp32: dimension too large");
  const c10::cuda::CUDAGuard guard(main_grad.device());
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // already bound to the current stream
  // cuBLAS is column-major: the row-major [out, in] main_grad is the column-major [in, out] matrix
  // C = x_cm @ g_cm^T, where x_cm = input viewed column-major ([in, tokens], ld in) and g_cm = grad_out viewed
  // column-major ([out, tokens], ld out).
  const float alpha = 1.0f, beta = 1.0f;
  check_cublas(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(in), static_cast<int>(out),
                            static_cast<int>(tokens), &alpha, x.data_ptr(), CUDA_R_16BF, static_cast<int>(in),
                            g.data_ptr(), CUDA_R_16BF, static_cast<int>(out), &beta, main_grad.data_ptr(),
                            CUDA_R_32F, static_cast<int>(in), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nanotronix weight-gradient GEMM accumulating into fp32 (see nanotronix/parallel/grad_accumulation_fusion.py)";
  m.def("wgrad_accumulate_fp32", &wgrad_accumulate_fp32);
}
