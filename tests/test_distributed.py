"""Real 2-process gloo tests of the navit_clip.dist collectives.

One spawn runs every scenario (process start-up dominates the cost); each worker writes its
results with torch.save and the parent compares them with what the collectives must produce. The
contrastive loss across 1-4 processes is tested in test_loss_distributed.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from processes import free_port, spawn_and_wait

pytestmark = pytest.mark.slow

WORLD = 2


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
    try:
        # (a) all_gather_with_grad
        x = (torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * rank).requires_grad_()
        y = dist.all_gather_with_grad(x)
        (y * gather_weights(rank)).sum().backward()
        res["gather_out"], res["gather_grad"] = y.detach(), x.grad
        res["gather_no_grad"] = dist.all_gather_no_grad(torch.tensor([rank, 10 + rank]))
        res["all_reduce"] = dist.all_reduce_sum(torch.tensor([1.0 + rank]))

        # (b) one asynchronous step around the ring, two kinds of message in flight at once
        big = dist.RingTransfer(torch.full((4, 3), float(rank)), torch.empty(4, 3), tag=1)
        small = dist.RingTransfer(torch.tensor([10 + rank]), torch.empty(1, dtype=torch.int64), tag=2)
        res["ring"] = (big.wait(), small.wait())
        res["ints"] = dist.all_gather_ints(5 + 2 * rank)
        dist.barrier()
    finally:
        torch.save(res, Path(out) / f"rank{rank}.pt")
        tdist.destroy_process_group()



@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    spawn_and_wait(_worker, (free_port(), str(out)), WORLD, 120, "distributed workers")
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


def test_ring_step_receives_from_the_previous_rank(results):
    for rank, r in enumerate(results):
        big, small = r["ring"]
        prev = (rank - 1) % WORLD
        assert torch.equal(big, torch.full((4, 3), float(prev)))
        assert torch.equal(small, torch.tensor([10 + prev]))
        assert r["ints"] == [5, 7]
