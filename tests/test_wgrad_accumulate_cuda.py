"""The fp32-accumulating weight-gradient GEMM (kernels.functions.wgrad_accumulate_fp32: torch.addmm with
out_dtype=float32 into the buffer itself; train.grad_accumulation_fusion and the fused loss's head gradient) on the
GPU: it adds grad_out^T @ input into an fp32 buffer in place, to fp32 accuracy against fp64 and against its PyTorch
twin (kernels.reference.wgrad_accumulate_fp32, what CPU runs), and touches nothing else of the bucket around it.

Runs only where CUDA exists (tools/gpu_checks.sh); skips, saying so, elsewhere (CPU CI). Tolerance: relative L2
error 1e-5 (bf16 inputs are exact in fp32; only fp32 summation order differs from the fp64 reference).
"""
import pytest
import torch

from nanotronix import accel
from nanotronix.kernels import functions, reference
from test_kernels_cuda import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tools/gpu_checks.sh)")


def test_torch_accumulates_bf16_gemms_into_fp32():
    """The torch this project supports (>= 2.11) has the fp32-accumulating GEMM: without it, the fusion refuses
    and the loss falls back to an fp32 GEMM."""
    assert accel.fp32_accumulating_gemm(), torch.__version__


@pytest.mark.parametrize("tokens,out,inp", [(333, 96, 160), (8192, 2048, 2048), (4096, 6144, 2048),
                                            (8192, 2048, 8192), (4096, 49152, 2048), (7, 1, 3)])
@pytest.mark.parametrize("transposed_grad", [False, True])
def test_wgrad_accumulates_the_fp32_sum_in_place(tokens, out, inp, transposed_grad):
    g = torch.Generator(device="cuda").manual_seed(tokens + out)
    grad_out = torch.randn(tokens, out, device="cuda", generator=g).bfloat16()
    if transposed_grad:  # a column-major grad
        grad_out = grad_out.t().contiguous().t()
    x = torch.randn(tokens, inp, device="cuda", generator=g).bfloat16()
    bucket = torch.randn(out * inp + 2 * 4096, device="cuda", generator=g)  # the buffer around main_grad
    main_grad = bucket[4096:4096 + out * inp].view(out, inp)
    before, ptr = bucket.clone(), main_grad.data_ptr()
    want = before[4096:4096 + out * inp].view(out, inp).double() + grad_out.double().t() @ x.double()
    functions.wgrad_accumulate_fp32(main_grad, grad_out, x)
    assert main_grad.data_ptr() == ptr and main_grad.dtype == torch.float32
    assert rel_err(main_grad, want) < 1e-5
    assert torch.equal(bucket[:4096], before[:4096]) and torch.equal(bucket[-4096:], before[-4096:])
    twin = before[4096:4096 + out * inp].view(out, inp).clone()
    reference.wgrad_accumulate_fp32(twin, grad_out, x)
    assert rel_err(main_grad, twin.double()) < 1e-5
