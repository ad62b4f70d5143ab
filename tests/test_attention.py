"""Packed attention backends: every backend equals the plain reference, keeps images apart and
never produces NaN for padding rows."""

from __future__ import annotations

import logging
import math
import time
import warnings

import pytest
import torch

from navit_clip.model import attention, attention_kernels
from navit_clip.model.attention import (AUTO_MODE_ENV, BACKENDS, AutoBackend, Backend, FlexBackend, PerImageSdpa, candidates,
                                        choose_backend, flash_available, get_attend, image_runs, reference_attend,
                                        same_segment_mask)

from attention_cases import random_qkv

# backends that train on CPU (forward and backward); flex runs forward only on CPU; flash needs CUDA
BACKEND_NAMES = ["reference", "sdpa", "sdpa_per_image", "sdpa_bucketed", "auto"]
FORWARD_NAMES = [*BACKEND_NAMES, "flex"]


def naive_attend(q, k, v, segment):
    """Token-by-token loop, independent of the masked-matrix formulation."""
    out = torch.empty_like(q)
    S, H, L, Dh = q.shape
    for s in range(S):
        for i in range(L):
            keys = (segment[s] == segment[s, i]).nonzero().squeeze(1)
            for h in range(H):
                scores = k[s, h, keys] @ q[s, h, i] / math.sqrt(Dh)
                out[s, h, i] = scores.softmax(0) @ v[s, h, keys]
    return out


def test_random_segments_cover_padding_and_several_images():
    _, _, _, segment = random_qkv()
    assert (segment == -1).any()
    assert int(segment.max()) >= 1
    assert (segment[-1] >= 0).all()


def test_reference_equals_naive_loop():
    q, k, v, segment = random_qkv(S=2, L=12)
    torch.testing.assert_close(reference_attend(q, k, v, segment), naive_attend(q, k, v, segment),
                               atol=1e-5, rtol=1e-5)


def test_same_segment_mask_is_block_diagonal():
    segment = torch.tensor([[0, 0, 1, -1]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert same_segment_mask(segment).shape == (1, 1, 4, 4)
    assert torch.equal(same_segment_mask(segment)[0, 0], expected)


@pytest.mark.parametrize("name", FORWARD_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backend_matches_reference(name, seed):
    q, k, v, segment = random_qkv(seed=seed)
    out = get_attend(name)(q, k, v, segment)
    assert out.shape == q.shape
    torch.testing.assert_close(out, reference_attend(q, k, v, segment), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_backend_gradients_match_reference(name):
    q, k, v, segment = random_qkv(seed=3)
    w = torch.randn_like(q)
    grads = []
    for fn in (get_attend(name), reference_attend):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        (fn(qq, kk, vv, segment) * w).sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_no_nan_for_padding_rows(name):
    q, k, v, segment = random_qkv(seed=4)
    segment[0, 5:] = -1  # a long stretch of padding
    q.requires_grad_()
    out = get_attend(name)(q, k, v, segment)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_fully_padded_sequence_is_finite(name):
    q, k, v, _ = random_qkv(S=1, seed=5)
    segment = torch.full((1, q.shape[2]), -1)
    assert torch.isfinite(get_attend(name)(q, k, v, segment)).all()


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_tokens_never_attend_across_images(name):
    q, k, v, segment = random_qkv(seed=6)
    attend = get_attend(name)
    base = attend(q, k, v, segment)
    for s in range(segment.shape[0]):
        for slot in segment[s].unique().tolist():
            other = segment[s] != slot
            if not other.any():
                continue
            k2, v2 = k.clone(), v.clone()
            k2[s, :, other] = torch.randn_like(k2[s, :, other]) * 100
            v2[s, :, other] = torch.randn_like(v2[s, :, other]) * 100
            out = attend(q, k2, v2, segment)
            mine = segment[s] == slot
            torch.testing.assert_close(out[s, :, mine], base[s, :, mine], atol=1e-6, rtol=0)
            # other sequences untouched entirely
            rest = [t for t in range(segment.shape[0]) if t != s]
            torch.testing.assert_close(out[rest], base[rest], atol=1e-6, rtol=0)
            # and the perturbed tokens' outputs did change (the perturbation is real)
            assert not torch.allclose(out[s, :, other], base[s, :, other])


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_sequence_position_does_not_matter(name):
    """An image's outputs depend only on its own tokens, not on where it sits in the sequence."""
    g = torch.Generator().manual_seed(7)
    H, Dh, n = 2, 8, 5
    q, k, v = (torch.randn(1, H, n, Dh, generator=g) for _ in range(3))
    alone = get_attend(name)(q, k, v, torch.zeros(1, n, dtype=torch.long))
    L = 16
    Q, K, V = (torch.randn(1, H, L, Dh, generator=g) for _ in range(3))
    for t, src in ((Q, q), (K, k), (V, v)):
        t[:, :, 7:7 + n] = src
    segment = torch.tensor([[0] * 7 + [1] * n + [-1] * (L - 7 - n)])
    packed = get_attend(name)(Q, K, V, segment)
    torch.testing.assert_close(packed[:, :, 7:7 + n], alone, atol=1e-6, rtol=1e-5)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="no-such-backend"):
        get_attend("no-such-backend")


def test_rule_picks_a_trainable_backend_on_cpu():
    cpu = torch.device("cpu")
    for dtype, head_dim in ((torch.float32, 64), (torch.bfloat16, 32), (torch.float32, 72)):
        assert choose_backend(cpu, dtype, head_dim) is BACKENDS["sdpa_bucketed"]
        assert set(candidates(cpu, dtype, head_dim)) == {"sdpa_bucketed", "sdpa", "sdpa_per_image"}


@pytest.mark.parametrize("mode", ["measure", "rule"])
def test_auto_matches_reference_at_short_and_long_lengths(mode, monkeypatch):
    monkeypatch.setenv(AUTO_MODE_ENV, mode)
    for L in (24, 600):
        q, k, v, segment = random_qkv(S=2, L=L, seed=17)
        w = torch.randn_like(q)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = AutoBackend()(*leaves, segment)
        ref = reference_attend(q, k, v, segment)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for got in torch.autograd.grad((out * w).sum(), leaves):
            assert torch.isfinite(got).all()


class Slowed(Backend):
    """A backend under the same name that sleeps `seconds` in every call."""

    def __init__(self, inner: Backend, seconds: float) -> None:
        self.inner, self.seconds, self.name = inner, seconds, inner.name

    def bind(self, segment):
        bound = self.inner.bind(segment)

        def attend(q, k, v):
            time.sleep(self.seconds)
            return bound(q, k, v)
        return attend


@pytest.mark.parametrize("fastest", ["sdpa", "sdpa_per_image", "sdpa_bucketed"])
def test_auto_picks_what_the_timed_trial_finds_fastest(fastest, monkeypatch, caplog):
    """The other candidates are slowed down by a sleep far above any timing noise: the trial
    must time real calls to see it."""
    monkeypatch.setenv(AUTO_MODE_ENV, "measure")
    for name in ("sdpa", "sdpa_per_image", "sdpa_bucketed"):
        if name != fastest:
            monkeypatch.setitem(BACKENDS, name, Slowed(BACKENDS[name], 0.25))
    q, k, v, segment = random_qkv(S=2, L=32, seed=18)
    auto = AutoBackend()
    with caplog.at_level(logging.INFO, logger="navit_clip.model.attention"):
        out = auto(*(t.clone().requires_grad_() for t in (q, k, v)), segment)
    assert list(auto.chosen.values()) == [fastest]
    assert f"attention auto: {fastest}" in caplog.text and "with backward" in caplog.text
    torch.testing.assert_close(out, reference_attend(q, k, v, segment), atol=1e-5, rtol=1e-5)


def test_auto_measures_once_per_shape_class(monkeypatch):
    monkeypatch.setenv(AUTO_MODE_ENV, "measure")
    timed = []
    speed = {"sdpa": 3.0, "sdpa_per_image": 1.0, "sdpa_bucketed": 2.0}

    def fake_trial(backend, q, segment, grad):
        timed.append((backend.name, tuple(q.shape), grad))
        return speed[backend.name]

    monkeypatch.setattr(attention, "trial_seconds", fake_trial)
    auto = AutoBackend()
    q, k, v, segment = random_qkv(S=2, L=32, seed=19)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for _ in range(3):  # bound once, called by every block; bound again for the next batch
        bound = auto.bind(segment)
        bound(*leaves)
        bound(*leaves)
    assert sorted(timed) == sorted((name, tuple(q.shape), True) for name in speed)
    assert list(auto.chosen.values()) == ["sdpa_per_image"]
    with torch.no_grad():  # forward only is a shape class of its own
        auto(q, k, v, segment)
    q2, k2, v2, segment2 = random_qkv(S=3, L=32, seed=20)  # so is another batch shape
    auto(q2, k2, v2, segment2)
    assert len(timed) == 3 * len(speed) and len(auto.chosen) == 3
    assert [grad for _, _, grad in timed[3:6]] == [False] * 3


def test_auto_leaves_out_a_candidate_that_fails(monkeypatch):
    monkeypatch.setenv(AUTO_MODE_ENV, "measure")

    class Broken(PerImageSdpa):
        def bind(self, segment):
            raise ValueError("cannot run these shapes")

    monkeypatch.setitem(BACKENDS, "sdpa_per_image", Broken())
    auto = AutoBackend()
    q, k, v, segment = random_qkv(seed=21)
    torch.testing.assert_close(auto(q, k, v, segment), reference_attend(q, k, v, segment), atol=1e-5, rtol=1e-5)
    assert list(auto.chosen.values())[0] in ("sdpa", "sdpa_bucketed")


def test_auto_trial_inside_activation_checkpointing(monkeypatch):
    """The first call of a checkpointed block runs the trial's own forward and backward while
    the checkpoint's saved-tensor hooks are active: gradients still equal the reference's."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv(AUTO_MODE_ENV, "measure")
    q, k, v, segment = random_qkv(seed=22)
    w = torch.randn_like(q)
    grads = []
    for fn in (AutoBackend().bind(segment), lambda a, b, c: reference_attend(a, b, c, segment)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = checkpoint(lambda a, b, c: fn(a * 2, b, c), *leaves, use_reentrant=False)
        grads.append(torch.autograd.grad((out * w).sum(), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flash_without_package_or_gpu_is_a_clear_error():
    if flash_available():
        pytest.skip("flash-attn and a GPU are present")
    with pytest.raises(ValueError, match="flash-attn"):
        get_attend("flash")


def test_image_runs_follow_the_packer_layout():
    segment = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    assert image_runs(segment) == [[(0, 2), (2, 3), (5, 1)], [(0, 6)]]
    assert image_runs(torch.tensor([[0, 1, 0, -1]])) is None  # slot 0 split in two runs


@pytest.mark.parametrize("name", ["sdpa_per_image", "sdpa_bucketed", "sdpa", "auto"])
def test_scattered_slots_match_reference(name):
    """Slot ids need not be contiguous: the per-image backend falls back to gather/scatter."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, 12, 8, generator=g, requires_grad=True) for _ in range(3))
    segment = torch.tensor([[0, 1, 0, 2, 1, 1, -1, 0, 2, -1, 1, 0], [1, 1, 0, 0, 1, 0, 0, -1, -1, 1, 0, 1]])
    assert image_runs(segment) is None
    out = get_attend(name)(q, k, v, segment)
    ref = reference_attend(q, k, v, segment)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_bound_backend_serves_many_calls(name):
    """bind(segment) prepares once; every later (q, k, v) with that segment gets the same answer
    as a fresh call (what the blocks of one forward rely on)."""
    q, k, v, segment = random_qkv(seed=12)
    bound = get_attend(name).bind(segment)
    for scale in (1.0, -2.0, 0.5):
        torch.testing.assert_close(bound(q * scale, k, v + scale), reference_attend(q * scale, k, v + scale, segment),
                                   atol=1e-5, rtol=1e-5)


def test_flex_refuses_cpu_training_with_a_clear_error():
    q, k, v, segment = random_qkv(seed=13)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        get_attend("flex")(q.requires_grad_(), k, v, segment)


def test_compiled_flex_runs_whole_tiles(monkeypatch):
    """The compiled path hands the kernel sequences padded to whole FLEX_BLOCK_SIZE tiles, with a
    block mask of that length, and the added tokens change no row, packer padding (-1) included.
    Eager flex (exact on CPU) stands in for the compiled kernel, so this runs on any CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    seen = []

    def whole_tiles(q, k, v, block_mask):
        seen.append((q.shape[2], k.shape[2], v.shape[2], *block_mask.seq_lengths))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(q, k, v, block_mask=block_mask)

    monkeypatch.setattr(attention_kernels, "_compiled_flex", lambda: whole_tiles)
    for L, tiled in ((40, 128), (130, 256), (256, 256)):
        q, k, v, segment = random_qkv(S=3, H=2, L=L, Dh=8, seed=L)
        segment[0, L // 2:] = -1  # a long stretch of packer padding
        out = FlexBackend(compile=True)(q, k, v, segment)
        assert out.shape == q.shape and seen[-1] == (tiled,) * 5
        torch.testing.assert_close(out, reference_attend(q, k, v, segment), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("L", [40, 128, 130, 200])
def test_compiled_flex_forward_on_cpu_matches_reference(L):
    """torch.compile of flex_attention on CPU (inductor's C++ template), forward only, at lengths
    that are not whole kernel tiles (torch 2.14's CPU kernel alone is wrong there on some CPUs)."""
    q, k, v, segment = random_qkv(S=2, H=2, L=L, Dh=16, seed=14)
    with torch.no_grad():
        out = FlexBackend(compile=True)(q, k, v, segment)
    torch.testing.assert_close(out, reference_attend(q, k, v, segment), atol=1e-5, rtol=1e-5)


def test_per_image_handles_one_image_filling_the_sequence():
    q, k, v, _ = random_qkv(S=2, seed=15)
    segment = torch.zeros(2, q.shape[2], dtype=torch.long)
    torch.testing.assert_close(PerImageSdpa()(q, k, v, segment), reference_attend(q, k, v, segment),
                               atol=1e-5, rtol=1e-5)


def test_bucketed_makes_one_call_per_power_of_two_bucket(monkeypatch):
    """Images of 3..17 tokens and padding runs: one SDPA call per length bucket (≤2, ≤4, ≤8, ≤16,
    ≤32 here), each no wider than its bucket, and the result still the reference's."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, attn_mask=None):
        calls.append(q.shape[2])
        return sdpa(q, k, v, attn_mask=attn_mask)

    segment = torch.tensor([[0] * 3 + [1] * 4 + [2] * 17 + [-1] * 8, [0] * 9 + [1] * 16 + [2] * 5 + [-1] * 2])
    g = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(2, 2, 32, 8, generator=g) for _ in range(3))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    out = BACKENDS["sdpa_bucketed"](q, k, v, segment)
    assert sorted(calls) == [2, 4, 8, 16, 17]  # lengths {2}, {3, 4}, {5, 8}, {9, 16}, {17}
    torch.testing.assert_close(out, reference_attend(q, k, v, segment), atol=1e-5, rtol=1e-5)
