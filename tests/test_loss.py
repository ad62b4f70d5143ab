"""contrastive_loss and reference_contrastive_loss (single process) against open_clip's ClipLoss /
SigLipLoss and against plain hand-written losses, on the valid pairs only, at several chunk sizes.
Across real processes: test_loss_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from navit_clip.loss import contrastive_loss, reference_contrastive_loss

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


CHUNKS = [1, 5, 1024]  # 5 divides neither n nor the valid count


def ours(kind, image, text, valid, scale, bias=None, chunk_size=1024):
    i, t, s = leaves(image, text, scale)
    b = leaves(bias)[0] if bias is not None else None
    loss = contrastive_loss(i, t, valid, s, b, kind=kind, chunk_size=chunk_size)
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


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_softmax_equals_open_clip_on_valid_rows(seed, with_bias, chunk):
    image, text, valid = make_inputs(seed=seed)
    scale = torch.tensor(12.5)
    bias = torch.tensor(-0.7) if with_bias else None
    loss, gi, gt, gs, gb = ours("softmax", image, text, valid, scale, bias, chunk)

    ri, rt, rs = leaves(image[valid], text[valid], scale)
    rb = leaves(bias)[0] if with_bias else None
    ref = ClipLoss()(ri, rt, rs, rb)
    ref.backward()

    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(gi[valid], ri.grad, **TOL)
    torch.testing.assert_close(gt[valid], rt.grad, **TOL)
    torch.testing.assert_close(gs, rs.grad, **TOL)
    if with_bias:
        # a constant shift of all logits cancels in a softmax: the bias is not used at all
        assert gb is None
        torch.testing.assert_close(rb.grad, torch.tensor(0.0), atol=1e-6, rtol=0)  # open_clip's: zero too


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_invalid_slots_get_exactly_zero_gradient_and_do_not_matter(kind, chunk):
    image, text, valid = make_inputs(seed=3)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    loss, gi, gt, _, _ = ours(kind, image, text, valid, scale, bias, chunk)
    assert torch.equal(gi[~valid], torch.zeros_like(gi[~valid]))
    assert torch.equal(gt[~valid], torch.zeros_like(gt[~valid]))
    assert (gi[valid].abs().sum(-1) > 0).all() and (gt[valid].abs().sum(-1) > 0).all()
    # other garbage in the invalid slots: the same loss, bit for bit
    image2, text2 = image.clone(), text.clone()
    image2[~valid] = -image2[~valid] * 3
    text2[~valid] = 1e3
    empty = (~valid).nonzero().squeeze(1)
    text2[empty[0]] = float("nan")
    image2[empty[-1]] = float("-inf")
    loss2 = contrastive_loss(image2, text2, valid, scale, bias, kind=kind, chunk_size=chunk)
    assert torch.equal(loss2, loss)
    # and the same as dropping the invalid slots altogether
    torch.testing.assert_close(contrastive_loss(image[valid], text[valid], valid[valid], scale, bias, kind=kind,
                                                chunk_size=chunk), loss, atol=0, rtol=0)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("seed", [0, 4])
def test_softmax_equals_hand_written_full_matrix(seed, chunk):
    image, text, valid = make_inputs(seed=seed)
    scale = torch.tensor(7.0)
    loss, gi, gt, gs, _ = ours("softmax", image, text, valid, scale, chunk_size=chunk)
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
@pytest.mark.parametrize("chunk", CHUNKS)
def test_sigmoid_equals_references_on_valid_rows(reference, inputs, scale, bias, chunk):
    """open_clip's SigLipLoss divides the summed pairwise loss by image_features.shape[0]; given only
    the valid rows that is B_valid, exactly what sigmoid_loss divides by."""
    image, text, valid = make_inputs(**inputs)
    scale, bias = torch.tensor(scale), torch.tensor(bias)
    loss, gi, gt, gs, gb = ours("sigmoid", image, text, valid, scale, bias, chunk)
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


def test_every_configurable_loss_kind_has_a_term():
    from navit_clip.config import LOSS_KINDS
    from navit_clip.loss.terms import TERMS

    assert set(TERMS) == set(LOSS_KINDS)


def test_sigmoid_without_bias_raises():
    image, text, valid = make_inputs()
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss(image, text, valid, torch.tensor(10.0), kind="sigmoid")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_no_valid_pair_raises(kind):
    image, text, valid = make_inputs()
    with pytest.raises(ValueError, match="no valid"):
        contrastive_loss(image, text, torch.zeros_like(valid), torch.tensor(10.0), torch.tensor(-1.0), kind=kind)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_reference_and_chunked_agree(kind):
    image, text, valid = make_inputs(n=23, seed=8, invalid=(0, 4, 9, 22))
    scale, bias = torch.tensor(6.0), torch.tensor(-2.0)
    got = ours(kind, image, text, valid, scale, bias, chunk_size=4)
    i, t, s = leaves(image, text, scale)
    b = leaves(bias)[0]
    ref = reference_contrastive_loss(i, t, valid, s, b if kind == "sigmoid" else None, kind=kind)
    ref.backward()
    for mine, theirs in zip(got[:4], (ref.detach(), i.grad, t.grad, s.grad)):
        torch.testing.assert_close(mine, theirs, **TOL)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_bf16_inputs_are_accumulated_in_fp32(kind):
    """bf16 embeddings: the loss equals the fp32 loss of the same (bf16-rounded) values to fp32
    precision, and the gradients come back in bf16."""
    image, text, valid = make_inputs(n=40, D=16, seed=9, invalid=(3, 17))
    image, text = image.bfloat16(), text.bfloat16()
    scale, bias = torch.tensor(20.0), torch.tensor(-5.0)
    loss, gi, gt, _, _ = ours(kind, image, text, valid, scale, bias, chunk_size=7)
    ref_loss, ri, rt, _, _ = ours(kind, image.float(), text.float(), valid, scale, bias, chunk_size=7)
    assert loss.dtype == torch.float32 and gi.dtype == gt.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gi.float(), ri, atol=1e-3, rtol=1e-2)  # bf16 rounding of the gradient only


def test_temperature_is_clamped():
    image, text, valid = make_inputs(seed=2)
    hot = torch.tensor(1e4, requires_grad=True)
    clamped = contrastive_loss(image, text, valid, hot, max_logit_scale=50.0)
    torch.testing.assert_close(clamped, contrastive_loss(image, text, valid, torch.tensor(50.0)))
    clamped.backward()
    assert hot.grad == 0  # past the clamp the temperature gets no gradient


@pytest.mark.parametrize("bad, message", [
    (dict(text=torch.zeros(12, 9)), "both be"),
    (dict(valid=torch.ones(12)), "bool"),
    (dict(valid=torch.ones(11, dtype=torch.bool)), "shape"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_inputs_are_named(bad, message):
    image, text, valid = make_inputs()
    args = dict(image_emb=image, text_emb=text, valid=valid, logit_scale=torch.tensor(10.0))
    kwargs = {k: bad.pop(k) for k in list(bad) if k == "chunk_size"}
    args.update({("text_emb" if k == "text" else k): v for k, v in bad.items()})
    with pytest.raises(ValueError, match=message):
        contrastive_loss(**args, **kwargs)
