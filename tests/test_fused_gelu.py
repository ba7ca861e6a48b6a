"""The MLP's GELU: exact (erf) on CPU and in float32, fused into fc1's matmul epilogue (tanh GELU) for bf16/fp16
on CUDA. The CUDA checks skip without CUDA; the CPU checks run everywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import m2d2_embed.encoder as E

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def mlp(device: str = "cpu", dtype: torch.dtype = torch.float32) -> E.Mlp:
    torch.manual_seed(0)
    m = E.Mlp(768, 3072)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.to(device, dtype).eval()


def erf_reference(m: E.Mlp, x: torch.Tensor) -> torch.Tensor:
    return m.fc2(F.gelu(m.fc1(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_keeps_the_exact_gelu(dtype):
    m, x = mlp(dtype=dtype), torch.randn(2, 7, 768).to(dtype)
    with torch.inference_mode():
        assert torch.equal(m(x), erf_reference(m, x))


def test_tanh_and_erf_gelu_differ_by_less_than_bf16_resolution():
    # why the fused epilogue is acceptable in bf16: its approximation error is below bf16 rounding near 1
    x = torch.linspace(-8, 8, 200001, dtype=torch.float64)
    err = (F.gelu(x) - F.gelu(x, approximate="tanh")).abs().max().item()
    assert 1e-4 < err < 5e-4 < 2.0**-8


@needs_cuda
@pytest.mark.gpu
def test_cuda_fp32_keeps_the_exact_gelu():
    m, x = mlp("cuda"), torch.randn(2, 311, 768, device="cuda")
    with torch.inference_mode():
        assert torch.equal(m(x), erf_reference(m, x))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_fuses_a_tanh_gelu_and_stays_close_to_erf(dtype, monkeypatch):
    m, x = mlp("cuda", dtype), torch.randn(4, 311, 768, device="cuda", dtype=dtype)
    with torch.inference_mode():
        fused = m(x).float()
        tanh = m.fc2(F.gelu(m.fc1(x), approximate="tanh")).float()
        monkeypatch.setattr(E, "FUSED_GELU", False)
        erf = m(x).float()
    assert torch.equal(erf, erf_reference(m, x).float())  # the switch really turns the fused path off
    scale = erf.abs().max().item()
    # same function as an unfused tanh GELU (rounding of the epilogue aside) and within bf16 error of erf
    assert (fused - tanh).abs().max().item() < 0.02 * scale
    assert (fused - erf).abs().max().item() < 0.03 * scale
    cos = F.cosine_similarity(fused.reshape(-1, 768), erf.reshape(-1, 768)).min().item()
    assert cos > 0.999
