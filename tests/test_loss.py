"""contrastive_loss (single process) against open_clip's ClipLoss / SigLipLoss and against plain
hand-written losses, on the valid pairs only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from navit_clip.loss import contrastive_loss

TOL = dict(atol=1e-6, rtol=1e-5)


def make_inputs(n=12, D=8, seed=0, invalid=(2, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, D, generator=g) + 0.5 * image, dim=-1)
    valid = torch.ones(n, dtype=torch.bool)
    valid[list(invalid)] = False
    # invalid slots hold garbage (as a real model may put there): it must not matter
    image[~valid] = torch.randn(int((~valid).sum()), D, generator=g) * 7
    text[~valid] = torch.randn(int((~valid).sum()), D, generator=g) * 7
    return image, text, valid


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def ours(kind, image, text, valid, scale, bias=None):
    i, t, s = leaves(image, text, scale)
    b = leaves(bias)[0] if bias is not None else None
    loss = contrastive_loss(i, t, valid, s, b, kind=kind)
    loss.backward()
    return loss.detach(), i.grad, t.grad, s.grad, (b.grad if b is not None else None)


def hand_softmax(image, text, scale):
    """Symmetric InfoNCE written out with explicit log-sum-exps."""
    B = len(image)
    logits = scale * image @ text.T
    rows = sum(torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(B)) / B
    cols = sum(torch.logsumexp(logits[:, j], 0) - logits[j, j] for j in range(B)) / B
    return (rows + cols) / 2


def hand_sigmoid(image, text, scale, bias):
    B = len(image)
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            total = total + torch.log1p(torch.exp(-z * (scale * image[i] @ text[j] + bias)))
    return total / B


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_softmax_equals_open_clip_on_valid_rows(seed, with_bias):
    image, text, valid = make_inputs(seed=seed)
    scale = torch.tensor(12.5)
    bias = torch.tensor(-0.7) if with_bias else None
    loss, gi, gt, gs, gb = ours("softmax", image, text, valid, scale, bias)

    ri, rt, rs = leaves(image[valid], text[valid], scale)
    rb = leaves(bias)[0] if with_bias else None
    ref = ClipLoss()(ri, rt, rs, rb)
    ref.backward()

    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(gi[valid], ri.grad, **TOL)
    torch.testing.assert_close(gt[valid], rt.grad, **TOL)
    torch.testing.assert_close(gs, rs.grad, **TOL)
    if with_bias:
        # a constant shift of all logits cancels in a softmax
        torch.testing.assert_close(gb, torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_invalid_slots_get_exactly_zero_gradient_and_do_not_matter(kind):
    image, text, valid = make_inputs(seed=3)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    loss, gi, gt, _, _ = ours(kind, image, text, valid, scale, bias)
    assert torch.equal(gi[~valid], torch.zeros_like(gi[~valid]))
    assert torch.equal(gt[~valid], torch.zeros_like(gt[~valid]))
    assert (gi[valid].abs().sum(-1) > 0).all() and (gt[valid].abs().sum(-1) > 0).all()
    # other garbage in the invalid slots: the same loss, bit for bit
    image2, text2 = image.clone(), text.clone()
    image2[~valid] = -image2[~valid] * 3
    text2[~valid] = 1e3
    loss2 = contrastive_loss(image2, text2, valid, scale, bias, kind=kind)
    assert torch.equal(loss2, loss)
    # and the same as dropping the invalid slots altogether
    torch.testing.assert_close(contrastive_loss(image[valid], text[valid], valid[valid], scale, bias, kind=kind),
                               loss, atol=0, rtol=0)


@pytest.mark.parametrize("seed", [0, 4])
def test_softmax_equals_hand_written_full_matrix(seed):
    image, text, valid = make_inputs(seed=seed)
    scale = torch.tensor(7.0)
    loss, gi, gt, gs, _ = ours("softmax", image, text, valid, scale)
    ri, rt, rs = leaves(image[valid], text[valid], scale)
    ref = hand_softmax(ri, rt, rs)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(gi[valid], ri.grad, **TOL)
    torch.testing.assert_close(gt[valid], rt.grad, **TOL)
    torch.testing.assert_close(gs, rs.grad, **TOL)


def test_softmax_learned_log_scale_gradient():
    """Gradient w.r.t. the log-temperature parameter as the model uses it (exp of a parameter)."""
    image, text, valid = make_inputs(seed=5)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    contrastive_loss(image, text, valid, log_scale.exp()).backward()
    ref_log = torch.tensor(math.log(10.0), requires_grad=True)
    ClipLoss()(image[valid], text[valid], ref_log.exp()).backward()
    torch.testing.assert_close(log_scale.grad, ref_log.grad, **TOL)


def test_softmax_perfect_alignment_is_near_zero_and_chance_is_log_b():
    eye = torch.eye(6)
    valid = torch.ones(6, dtype=torch.bool)
    assert contrastive_loss(eye, eye, valid, torch.tensor(100.0)) < 1e-6
    # all logits equal: every choice has probability 1/B
    same = F.normalize(torch.ones(6, 4), dim=-1)
    torch.testing.assert_close(contrastive_loss(same, same, valid, torch.tensor(5.0)), torch.tensor(math.log(6)))


@pytest.mark.parametrize("reference, inputs, scale, bias", [
    *[("open_clip", dict(seed=seed), 10.0, -4.0) for seed in (0, 1, 2)],
    ("hand", dict(seed=6, n=7, invalid=(0, 6)), 5.0, -2.0),
])
def test_sigmoid_equals_references_on_valid_rows(reference, inputs, scale, bias):
    """open_clip's SigLipLoss divides the summed pairwise loss by image_features.shape[0]; given only
    the valid rows that is B_valid, exactly what sigmoid_loss divides by."""
    image, text, valid = make_inputs(**inputs)
    scale, bias = torch.tensor(scale), torch.tensor(bias)
    loss, gi, gt, gs, gb = ours("sigmoid", image, text, valid, scale, bias)
    ri, rt, rs, rb = leaves(image[valid], text[valid], scale, bias)
    ref = (SigLipLoss() if reference == "open_clip" else hand_sigmoid)(ri, rt, rs, rb)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(gi[valid], ri.grad, **TOL)
    torch.testing.assert_close(gt[valid], rt.grad, **TOL)
    torch.testing.assert_close(gs, rs.grad, **TOL)
    torch.testing.assert_close(gb, rb.grad, **TOL)


def test_single_valid_pair():
    image, text, valid = make_inputs(n=4, invalid=(0, 1, 3))
    assert contrastive_loss(image, text, valid, torch.tensor(10.0)) == 0  # log(1) on both sides
    bias = torch.tensor(-1.0)
    got = contrastive_loss(image, text, valid, torch.tensor(10.0), bias, kind="sigmoid")
    torch.testing.assert_close(got, -F.logsigmoid(10.0 * image[2] @ text[2] + bias))


def test_unknown_kind_raises():
    image, text, valid = make_inputs()
    with pytest.raises(ValueError, match="hinge"):
        contrastive_loss(image, text, valid, torch.tensor(10.0), kind="hinge")


def test_sigmoid_without_bias_raises():
    image, text, valid = make_inputs()
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss(image, text, valid, torch.tensor(10.0), kind="sigmoid")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_no_valid_pair_raises(kind):
    image, text, valid = make_inputs()
    with pytest.raises(ValueError, match="no valid"):
        contrastive_loss(image, text, torch.zeros_like(valid), torch.tensor(10.0), torch.tensor(-1.0), kind=kind)
