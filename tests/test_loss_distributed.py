"""The chunked contrastive loss across 1, 2, 3 and 4 real gloo processes.

Each world size is one torch.multiprocessing spawn that runs every scenario; the workers save what
they computed and the parent compares it with single-process references on the concatenation of
all ranks' inputs:
  * `reference_contrastive_loss` (the plain full-matrix loss on the valid pairs, itself checked
    against open_clip and hand-written losses in test_loss.py), for random padding patterns, an
    all-empty rank, a single valid pair in the whole cluster, NaN/Inf garbage in empty slots and
    chunk sizes that do not divide the slot count;
  * open_clip's ClipLoss(local_loss=True, gather_with_grad=True) and SigLipLoss running in the
    same processes, without padding, through a small shared linear "tower" whose parameter
    gradients are averaged over ranks the way DeepSpeed does.
Gradient relation (see the navit_clip.loss docstring): own-embedding gradients are W · dL/de;
temperature and bias gradients are dL/ds and dL/db on every rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from navit_clip.loss import contrastive_loss, reference_contrastive_loss

from processes import free_port, spawn_and_wait

N = 7  # slots per rank
D = 6
CHUNKS = (1, 3, 4, 1024)  # 3 and 4 divide neither N nor the valid counts
KINDS = ("softmax", "sigmoid")
TOL = dict(atol=1e-5, rtol=1e-5)


def valid_pattern(name: str, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 * world + len(name))
    if name == "full":
        valid = torch.ones(world * N, dtype=torch.bool)
    elif name == "random":
        valid = torch.rand(world * N, generator=g) < 0.6
        valid[0] = True
    elif name == "empty_rank":  # the last rank holds no image at all
        valid = torch.rand(world * N, generator=g) < 0.7
        valid[0] = True
        valid[(world - 1) * N:] = False
    elif name == "one_pair":
        valid = torch.zeros(world * N, dtype=torch.bool)
        valid[world * N - 2] = True
    else:
        raise KeyError(name)
    return valid


def patterns(world: int) -> list[str]:
    return ["full", "random", "one_pair"] + (["empty_rank"] if world > 1 else [])


def global_inputs(name: str, world: int):
    """[W·N, D] embeddings with NaN/Inf garbage in the invalid slots, and the valid mask."""
    g = torch.Generator().manual_seed(world)
    image = F.normalize(torch.randn(world * N, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(world * N, D, generator=g) + 0.8 * image, dim=-1)
    valid = valid_pattern(name, world)
    image[~valid] = float("nan")
    text[~valid] = float("inf")
    return image, text, valid


def tower_inputs(world: int):
    """Raw per-slot features and a shared linear tower (the DeepSpeed-averaged parameters)."""
    g = torch.Generator().manual_seed(50 + world)
    return (torch.randn(world * N, 5, generator=g), torch.randn(world * N, 4, generator=g),
            torch.randn(5, D, generator=g), torch.randn(4, D, generator=g))


def tower_params(kind: str, w_img: torch.Tensor, w_txt: torch.Tensor) -> list[torch.Tensor]:
    params = [w_img.clone().requires_grad_(), w_txt.clone().requires_grad_(), torch.tensor(2.5, requires_grad=True)]
    if kind == "sigmoid":
        params.append(torch.tensor(-3.0, requires_grad=True))
    return params


def tower_embeddings(x_img, x_txt, params):
    return F.normalize(x_img @ params[0], dim=-1), F.normalize(x_txt @ params[1], dim=-1)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as tdist
    from open_clip.loss import ClipLoss, SigLipLoss

    from navit_clip import dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    sl = slice(rank * N, (rank + 1) * N)
    res: dict = {}
    try:
        for kind in KINDS:
            for name in patterns(world):
                image, text, valid = global_inputs(name, world)
                for chunk in CHUNKS:
                    i, t = image[sl].clone().requires_grad_(), text[sl].clone().requires_grad_()
                    s = torch.tensor(8.0, requires_grad=True)
                    b = torch.tensor(-4.0, requires_grad=True) if kind == "sigmoid" else None
                    loss = contrastive_loss(i, t, valid[sl], s, b, kind=kind, chunk_size=chunk)
                    loss.backward()
                    res[(kind, name, chunk)] = dict(loss=loss.detach(), image=i.grad, text=t.grad, scale=s.grad,
                                                    bias=None if b is None else b.grad)

            # a shared tower, gradients averaged over ranks: ours vs open_clip's distributed losses
            x_img, x_txt, w_img, w_txt = tower_inputs(world)
            for impl in ("ours", "open_clip"):
                params = tower_params(kind, w_img, w_txt)
                img, txt = tower_embeddings(x_img[sl], x_txt[sl], params)
                scale = params[2].exp()
                bias = params[3] if kind == "sigmoid" else None
                if impl == "ours":
                    loss = contrastive_loss(img, txt, torch.ones(N, dtype=torch.bool), scale, bias, kind=kind,
                                            chunk_size=3)
                elif kind == "softmax":
                    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(img, txt, scale)
                else:
                    loss = SigLipLoss(rank=rank, world_size=world)(img, txt, scale, bias)
                loss.backward()
                averaged = [dist.all_reduce_sum(p.grad.clone()) / world for p in params]
                mean_loss = dist.all_reduce_sum(loss.detach().clone().reshape(1)) / world
                res[(kind, "tower", impl)] = dict(loss=mean_loss, grads=averaged)

        # no valid pair anywhere: every rank raises, nobody hangs
        try:
            contrastive_loss(torch.randn(N, D), torch.randn(N, D), torch.zeros(N, dtype=torch.bool), torch.tensor(1.0))
            res["no_valid"] = "returned"
        except ValueError as err:
            res["no_valid"] = str(err)
        dist.barrier()
    finally:
        torch.save(res, Path(out) / f"rank{rank}.pt")
        tdist.destroy_process_group()



def run_world(world: int, out: Path) -> list[dict]:
    spawn_and_wait(_worker, (world, free_port(), str(out)), world, 300, f"{world} loss workers")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    return world, run_world(world, tmp_path_factory.mktemp(f"loss_world{world}"))


def reference(kind: str, name: str, world: int):
    image, text, valid = global_inputs(name, world)
    i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
    s = torch.tensor(8.0, requires_grad=True)
    b = torch.tensor(-4.0, requires_grad=True) if kind == "sigmoid" else None
    loss = reference_contrastive_loss(i, t, valid, s, b, kind=kind)
    loss.backward()
    return loss.detach(), i.grad, t.grad, s.grad, (None if b is None else b.grad), valid


@pytest.mark.parametrize("kind", KINDS)
def test_equals_full_matrix_loss_on_concatenated_valid_pairs(world_results, kind):
    world, results = world_results
    for name in patterns(world):
        ref_loss, ref_image, ref_text, ref_scale, ref_bias, valid = reference(kind, name, world)
        for chunk in CHUNKS:
            for rank, res in enumerate(results):
                got = res[(kind, name, chunk)]
                sl = slice(rank * N, (rank + 1) * N)
                where = f"{kind}/{name}/chunk {chunk}/rank {rank}"
                torch.testing.assert_close(got["loss"], ref_loss, **TOL, msg=where)
                torch.testing.assert_close(got["image"], world * ref_image[sl], **TOL, msg=where)
                torch.testing.assert_close(got["text"], world * ref_text[sl], **TOL, msg=where)
                torch.testing.assert_close(got["scale"], ref_scale, **TOL, msg=where)
                if kind == "sigmoid":
                    torch.testing.assert_close(got["bias"], ref_bias, **TOL, msg=where)
                # garbage in empty slots never leaks, and they get exactly zero gradient
                empty = ~valid[sl]
                assert torch.isfinite(got["image"]).all() and torch.isfinite(got["text"]).all(), where
                assert not got["image"][empty].any() and not got["text"][empty].any(), where


@pytest.mark.parametrize("kind", KINDS)
def test_averaged_tower_gradients_equal_open_clip_and_single_process(world_results, kind):
    world, results = world_results
    x_img, x_txt, w_img, w_txt = tower_inputs(world)
    params = tower_params(kind, w_img, w_txt)
    img, txt = tower_embeddings(x_img, x_txt, params)
    ref = reference_contrastive_loss(img, txt, torch.ones(world * N, dtype=torch.bool), params[2].exp(),
                                     params[3] if kind == "sigmoid" else None, kind=kind)
    ref.backward()
    for rank, res in enumerate(results):
        ours, theirs = res[(kind, "tower", "ours")], res[(kind, "tower", "open_clip")]
        torch.testing.assert_close(ours["loss"].reshape(()), ref.detach(), **TOL)
        torch.testing.assert_close(ours["loss"], theirs["loss"], **TOL)
        assert len(ours["grads"]) == len(theirs["grads"]) == len(params)
        for k, (mine, other, p) in enumerate(zip(ours["grads"], theirs["grads"], params)):
            torch.testing.assert_close(mine, other, **TOL, msg=f"rank {rank} parameter {k}: ours vs open_clip")
            torch.testing.assert_close(mine, p.grad, **TOL, msg=f"rank {rank} parameter {k}: ours vs 1 process")


def test_no_valid_pair_anywhere_raises_on_every_rank(world_results):
    _, results = world_results
    assert all("no valid image-text pair" in res["no_valid"] for res in results)
