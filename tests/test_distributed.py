"""Real 2-process gloo tests of navit_clip.dist collectives and the cross-rank contrastive loss.

One spawn runs every scenario (process start-up dominates the cost); each worker writes its
results with torch.save and the parent compares them with single-process references on the
concatenation of both ranks' inputs.

The gradient relation asserted here: every rank computes the same global loss L. The backward of
all_gather_with_grad sums the gathered gradient over ranks, so on rank r
    d(local loss)/d(local embeddings_r) = W · dL/d(embeddings_r)            (W = world size),
while parameters that are not gathered (logit_scale, logit_bias) get dL/dθ on every rank. After the
data-parallel average (sum over ranks / W) a shared parameter θ therefore gets
    (1/W) Σ_r W · dL/dx_r · dx_r/dθ = dL/dθ,   and the scale (1/W) Σ_r dL/ds = dL/ds,
i.e. exactly the gradient of the one global loss.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from navit_clip.loss import contrastive_loss

pytestmark = pytest.mark.slow

WORLD = 2
N = 6  # slots per rank
D = 8
TOL = dict(atol=1e-6, rtol=1e-5)

# invalid slots differ per rank; in "holes" rank 1 has no valid slot at all
VALID = {
    "mixed": [[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]],
    "holes": [[1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]],
}


def global_inputs(case: str, seed: int = 0):
    """Deterministic [W·N, D] image/text embeddings (garbage in invalid slots) and [W·N] valid."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(WORLD * N, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(WORLD * N, D, generator=g) + 0.7 * image, dim=-1)
    valid = torch.tensor(VALID[case], dtype=torch.bool).flatten()
    image[~valid] = torch.randn(int((~valid).sum()), D, generator=g) * 5
    text[~valid] = torch.randn(int((~valid).sum()), D, generator=g) * 5
    return image, text, valid


def dp_inputs(seed: int = 1):
    """Raw per-slot features and shared projection weights for the data-parallel check."""
    g = torch.Generator().manual_seed(seed)
    x_img = torch.randn(WORLD * N, 5, generator=g)
    x_txt = torch.randn(WORLD * N, 4, generator=g)
    w_img = torch.randn(5, D, generator=g)
    w_txt = torch.randn(4, D, generator=g)
    valid = torch.tensor(VALID["mixed"], dtype=torch.bool).flatten()
    return x_img, x_txt, w_img, w_txt, valid


def dp_loss(x_img, x_txt, w_img, w_txt, log_scale, bias, valid, kind):
    image = F.normalize(x_img @ w_img, dim=-1)
    text = F.normalize(x_txt @ w_txt, dim=-1)
    return contrastive_loss(image, text, valid, log_scale.exp(), bias, kind=kind)


def gather_weights(rank: int) -> torch.Tensor:
    return torch.randn(WORLD * 3, 2, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    from navit_clip import dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    res: dict = {"rank": dist.rank(), "world": dist.world_size()}
    sl = slice(rank * N, (rank + 1) * N)
    try:
        # (a) all_gather_with_grad
        x = (torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * rank).requires_grad_()
        y = dist.all_gather_with_grad(x)
        (y * gather_weights(rank)).sum().backward()
        res["gather_out"], res["gather_grad"] = y.detach(), x.grad
        res["gather_no_grad"] = dist.all_gather_no_grad(torch.tensor([rank, 10 + rank]))
        res["all_reduce"] = dist.all_reduce_sum(torch.tensor([1.0 + rank]))

        # (b) the loss across ranks
        for kind in ("softmax", "sigmoid"):
            for case in VALID:
                image, text, valid = global_inputs(case)
                i, t = image[sl].clone().requires_grad_(), text[sl].clone().requires_grad_()
                s = torch.tensor(9.0, requires_grad=True)
                b = torch.tensor(-3.0, requires_grad=True) if kind == "sigmoid" else None
                loss = contrastive_loss(i, t, valid[sl], s, b, kind=kind)
                loss.backward()
                res[f"loss/{kind}/{case}"] = {
                    "loss": loss.detach(), "image": i.grad, "text": t.grad, "scale": s.grad,
                    "bias": b.grad if b is not None else None,
                }

            # (c) shared parameters with data-parallel gradient averaging
            x_img, x_txt, w_img, w_txt, valid = dp_inputs()
            params = [w_img.clone().requires_grad_(), w_txt.clone().requires_grad_(),
                      torch.tensor(2.0, requires_grad=True)]
            if kind == "sigmoid":
                params.append(torch.tensor(-2.0, requires_grad=True))
            loss = dp_loss(x_img[sl], x_txt[sl], params[0], params[1], params[2],
                           params[3] if kind == "sigmoid" else None, valid[sl], kind)
            loss.backward()
            grads = []
            for p in params:
                gsum = dist.all_reduce_sum(p.grad.clone())
                grads.append(gsum / dist.world_size())
            res[f"dp/{kind}"] = {"loss": loss.detach(), "grads": grads}

        # no valid pair on any rank: every rank raises (and nobody hangs)
        try:
            contrastive_loss(torch.randn(N, D), torch.randn(N, D), torch.zeros(N, dtype=torch.bool),
                             torch.tensor(1.0))
            res["no_valid_raised"] = False
        except ValueError as err:
            res["no_valid_raised"] = "no valid" in str(err)
        dist.barrier()
    finally:
        torch.save(res, Path(out) / f"rank{rank}.pt")
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    ctx = mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 60
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("distributed workers did not finish within 60 s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_rank_and_world(results):
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == WORLD for r in results)


def test_all_gather_with_grad_forward_in_rank_order(results):
    expected = torch.cat([torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * r for r in range(WORLD)])
    for r in results:
        assert torch.equal(r["gather_out"], expected)


def test_all_gather_with_grad_backward_sums_over_ranks(results):
    total = sum(gather_weights(r) for r in range(WORLD))
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["gather_grad"], total[rank * 3:(rank + 1) * 3], atol=1e-6, rtol=0)
        # and not just this rank's own weights
        assert not torch.allclose(r["gather_grad"], gather_weights(rank)[rank * 3:(rank + 1) * 3])


def test_plain_collectives(results):
    for r in results:
        assert torch.equal(r["gather_no_grad"], torch.tensor([0, 10, 1, 11]))
        assert torch.equal(r["all_reduce"], torch.tensor([3.0]))


@pytest.mark.parametrize("case", list(VALID))
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_loss_across_ranks_equals_single_process(results, kind, case):
    image, text, valid = global_inputs(case)
    i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
    s = torch.tensor(9.0, requires_grad=True)
    b = torch.tensor(-3.0, requires_grad=True) if kind == "sigmoid" else None
    ref = contrastive_loss(i, t, valid, s, b, kind=kind)
    ref.backward()
    for rank, r in enumerate(results):
        got = r[f"loss/{kind}/{case}"]
        sl = slice(rank * N, (rank + 1) * N)
        # same value on every rank, equal to the loss of the concatenation
        torch.testing.assert_close(got["loss"], ref.detach(), **TOL)
        # local embedding grads: W × the global gradient of this rank's slice
        torch.testing.assert_close(got["image"], WORLD * i.grad[sl], **TOL)
        torch.testing.assert_close(got["text"], WORLD * t.grad[sl], **TOL)
        # after the data-parallel average over ranks: exactly the global gradient
        torch.testing.assert_close(got["image"] / WORLD, i.grad[sl], **TOL)
        # not-gathered scalars: the global gradient on every rank
        torch.testing.assert_close(got["scale"], s.grad, **TOL)
        if kind == "sigmoid":
            torch.testing.assert_close(got["bias"], b.grad, **TOL)
        # invalid local slots get no gradient
        lv = valid[sl]
        assert torch.equal(got["image"][~lv], torch.zeros_like(got["image"][~lv]))
    # the averaged scalar gradient is the global one too
    avg_scale = sum(r[f"loss/{kind}/{case}"]["scale"] for r in results) / WORLD
    torch.testing.assert_close(avg_scale, s.grad, **TOL)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_data_parallel_averaged_param_grads_equal_global(results, kind):
    x_img, x_txt, w_img, w_txt, valid = dp_inputs()
    params = [w_img.clone().requires_grad_(), w_txt.clone().requires_grad_(), torch.tensor(2.0, requires_grad=True)]
    if kind == "sigmoid":
        params.append(torch.tensor(-2.0, requires_grad=True))
    ref = dp_loss(x_img, x_txt, params[0], params[1], params[2], params[3] if kind == "sigmoid" else None,
                  valid, kind)
    ref.backward()
    for r in results:
        got = r[f"dp/{kind}"]
        torch.testing.assert_close(got["loss"], ref.detach(), **TOL)
        assert len(got["grads"]) == len(params)
        for g, p in zip(got["grads"], params):
            torch.testing.assert_close(g, p.grad, **TOL)


def test_no_valid_pair_on_any_rank_raises_everywhere(results):
    assert all(r["no_valid_raised"] for r in results)
