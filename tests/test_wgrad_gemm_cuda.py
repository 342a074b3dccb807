"""The csrc/ weight-gradient GEMM (nanotronix._wgrad_gemm, train.grad_accumulation_fusion) on the GPU: it adds
grad_out^T @ input into an fp32 buffer in place, to fp32 accuracy against fp64 and against its PyTorch twin
(kernels.reference.wgrad_accumulate_fp32, what CPU runs), and touches nothing else of the bucket around it.

Runs only where CUDA and the built extension exist (tools/gpu_checks.sh after `python setup.py build_ext
--inplace`); skips, saying so, elsewhere (CPU CI). Tolerance: relative L2 error 1e-5 (bf16 inputs are exact in
fp32; only fp32 summation order differs from the fp64 reference).
"""
import pytest
import torch

from nanotronix import accel
from nanotronix.kernels import reference
from test_kernels_cuda import rel_err

ext = accel.wgrad_gemm_kernel()
pytestmark = pytest.mark.skipif(ext is None, reason="needs CUDA and the built nanotronix._wgrad_gemm extension "
                                                    "(python setup.py build_ext --inplace on a CUDA machine)")


@pytest.mark.parametrize("tokens,out,inp", [(333, 96, 160), (8192, 2048, 2048), (4096, 6144, 2048),
                                            (8192, 2048, 8192), (7, 1, 3)])
@pytest.mark.parametrize("transposed_grad", [False, True])
def test_wgrad_accumulates_the_fp32_sum_in_place(tokens, out, inp, transposed_grad):
    g = torch.Generator(device="cuda").manual_seed(tokens + out)
    grad_out = torch.randn(tokens, out, device="cuda", generator=g).bfloat16()
    if transposed_grad:  # a non-contiguous grad (the op makes it contiguous)
        grad_out = grad_out.t().contiguous().t()
    x = torch.randn(tokens, inp, device="cuda", generator=g).bfloat16()
    bucket = torch.randn(out * inp + 2 * 4096, device="cuda", generator=g)  # the buffer around main_grad
    main_grad = bucket[4096:4096 + out * inp].view(out, inp)
    before, ptr = bucket.clone(), main_grad.data_ptr()
    want = before[4096:4096 + out * inp].view(out, inp).double() + grad_out.double().t() @ x.double()
    ext.wgrad_accumulate_fp32(main_grad, grad_out, x)
    assert main_grad.data_ptr() == ptr
    assert rel_err(main_grad, want) < 1e-5
    assert torch.equal(bucket[:4096], before[:4096]) and torch.equal(bucket[-4096:], before[-4096:])
    twin = before[4096:4096 + out * inp].view(out, inp).clone()
    reference.wgrad_accumulate_fp32(twin, grad_out, x)
    assert rel_err(main_grad, twin.double()) < 1e-5


def test_wgrad_rejects_wrong_inputs():
    main_grad = torch.zeros(4, 3, device="cuda")
    x, g = torch.zeros(5, 3, device="cuda").bfloat16(), torch.zeros(5, 4, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        ext.wgrad_accumulate_fp32(main_grad, g.float(), x)
    with pytest.raises(RuntimeError, match="float32"):
        ext.wgrad_accumulate_fp32(main_grad.bfloat16(), g, x)
    with pytest.raises(RuntimeError, match="expected main_grad"):
        ext.wgrad_accumulate_fp32(main_grad, g[:, :3], x)
