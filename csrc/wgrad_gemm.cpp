// nanotronix._wgrad_gemm: a linear layer's weight gradient accumulated into its fp32 gradient buffer by the GEMM
// itself (train.grad_accumulation_fusion; nanotronix/parallel/grad_accumulation_fusion.py).
//
// main_grad [out, in] (fp32) += grad_out[tokens, out]^T @ input[tokens, in] (both bf16), as one cuBLAS GEMM with
// bf16 A/B, an fp32 C read and written in place (beta = 1) and fp32 accumulation: the gradient never exists as a
// bf16 tensor and needs no separate add. A module of its own (built with optional=True by setup.py) because it
// links cuBLAS: if that fails on some machine, the fused kernels of nanotronix._kernels still build.
//
// It uses a cuBLAS handle of its own (one per device, on the current stream) rather than torch's: torch's handle
// comes from ATen/cuda/CUDAContext.h, which needs the cuSPARSE and cuSOLVER headers as well, and a CUDA toolkit
// installed for nvcc alone (as on our CPU development machines) has none of them. setup.py finds cuBLAS's header
// and library in the toolkit or in the nvidia-cublas wheel that CUDA builds of torch install.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublas_v2.h>

#include <mutex>
#include <vector>

namespace {

void check_cublas(cublasStatus_t status) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "nanotronix._wgrad_gemm: cuBLAS error ", static_cast<int>(status));
}

// The handle of `device`, created on first use and kept for the process (cuBLAS handles are meant to be reused).
cublasHandle_t handle_for(int device) {
  static std::mutex lock;
  static std::vector<cublasHandle_t> handles;
  std::lock_guard<std::mutex> guard(lock);
  if (device >= static_cast<int>(handles.size())) handles.resize(device + 1, nullptr);
  if (handles[device] == nullptr) check_cublas(cublasCreate(&handles[device]));
  return handles[device];
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
  cublasHandle_t handle = handle_for(main_grad.get_device());
  check_cublas(cublasSetStream(handle, c10::cuda::getCurrentCUDAStream(main_grad.get_device()).stream()));
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
  m.doc() = "nanotronix weight-gradient GEMM accumulating into fp32 (nanotronix/parallel/grad_accumulation_fusion.py)";
  m.def("wgrad_accumulate_fp32", &wgrad_accumulate_fp32);
}
