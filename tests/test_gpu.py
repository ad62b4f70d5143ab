"""Attention backends on a CUDA device: every backend equals the fp32 reference (computed on CPU
from the same inputs) in bf16 and fp32, forward and backward, at a length that is a whole number
of flex tiles and at one that is not. Marked `gpu`: `pytest -m gpu` runs them, and without CUDA
they are skipped (tools/gpu_check.py runs them on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from attention_cases import random_qkv
from navit_clip.model.attention import BACKENDS, FLEX_BLOCK_SIZE, choose_backend, flash_available, get_attend, \
    reference_attend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = ["flex", "flash", "sdpa_per_image", "sdpa", "auto"]
LENGTHS = [130, 256]  # 130: not a whole number of flex tiles; 256: exactly two
TOLERANCE = {torch.float32: (dict(atol=1e-4, rtol=1e-4), dict(atol=1e-4, rtol=1e-4)),
             torch.bfloat16: (dict(atol=3e-2, rtol=3e-2), dict(atol=5e-2, rtol=5e-2))}


def test_lengths_cover_partial_and_whole_tiles():
    assert any(L % FLEX_BLOCK_SIZE for L in LENGTHS) and any(L % FLEX_BLOCK_SIZE == 0 for L in LENGTHS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_backend_forward_and_backward_match_reference(name, L, dtype):
    if name == "flash" and not flash_available():
        pytest.skip("flash-attn is not installed")
    if name == "flash" and dtype == torch.float32:
        pytest.skip("flash-attn runs fp16/bf16 only")
    q, k, v, segment = random_qkv(S=3, H=4, L=L, Dh=64, seed=L)
    segment[0, L // 3:] = -1  # a long stretch of packer padding
    out_tol, grad_tol = TOLERANCE[dtype]
    dev = torch.device("cuda")
    w = torch.randn_like(q)
    leaves = [t.to(dev, dtype).requires_grad_() for t in (q, k, v)]
    out = get_attend(name)(*leaves, segment.to(dev))
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attend(*ref_leaves, segment)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float().cpu(), ref, **out_tol)
    got = torch.autograd.grad((out * w.to(dev, dtype)).sum(), leaves)
    want = torch.autograd.grad((ref * w).sum(), ref_leaves)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float().cpu(), b, **grad_tol)


@pytest.mark.parametrize("name", ["flex", "sdpa_per_image", "auto"])
def test_backend_keeps_images_apart_in_bf16(name):
    q, k, v, segment = random_qkv(S=2, H=4, L=200, Dh=64, seed=9)
    dev = torch.device("cuda")
    q, k, v = (t.to(dev, torch.bfloat16) for t in (q, k, v))
    segment = segment.to(dev)
    attend = get_attend(name)
    base = attend(q, k, v, segment)
    other = segment[0] != 0
    k2, v2 = k.clone(), v.clone()
    k2[0, :, other] += 5
    v2[0, :, other] += 5
    out = attend(q, k2, v2, segment)
    mine = segment[0] == 0
    torch.testing.assert_close(out[0, :, mine], base[0, :, mine], atol=1e-6, rtol=0)
    assert not torch.allclose(out[0, :, other], base[0, :, other])


def test_auto_is_flex_on_cuda_for_power_of_two_heads():
    assert choose_backend(torch.device("cuda"), torch.bfloat16, 64) is BACKENDS["flex"]
    assert choose_backend(torch.device("cuda"), torch.bfloat16, 72) is not BACKENDS["flex"]
