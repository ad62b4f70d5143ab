"""Everything distributed: process-group setup, rank and world size, collectives with autograd.

No other module calls torch.distributed. The same code runs as 1 process on a laptop CPU (gloo)
and as N processes on M nodes (nccl); the launcher's environment decides.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_env() -> None:
    """Fill in a single-process environment when no launcher set one, and pick DeepSpeed's CPU
    accelerator when there is no GPU, before deepspeed is imported."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_distributed() -> None:
    """Start the process group through DeepSpeed (gloo on CPU, nccl on GPU)."""
    prepare_env()
    if is_initialized():
        return
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)
    release_shm_buffer()


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce (its shm op) maps for `rank` of this job."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed all-reduce buffer (66 MB per rank in /dev/shm, i.e. memory)
    once every rank has mapped every buffer. DeepSpeed never unlinks it, so each CPU run, killed or
    not, left its buffers behind until /dev/shm filled and later runs died of memory; the mappings
    stay valid after the unlink and the memory returns when the processes exit."""
    if not shm_buffer_path(rank()).exists():
        return  # no shm op here (a GPU run, or ranks on several machines)
    barrier()  # every rank has opened every other rank's buffer during init
    shm_buffer_path(rank()).unlink(missing_ok=True)


def _collective_device() -> torch.device:
    """Where small collective tensors must live: nccl only moves GPU tensors."""
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank src's value on every rank."""
    if not is_initialized() or world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src=src)
    return int(t.item())


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank src's (picklable) value on every rank, e.g. a decision with the error that explains it."""
    if not is_initialized() or world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's (picklable) value, in rank order, on every rank."""
    if not is_initialized() or world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def first_failing_rank(failed: bool) -> int | None:
    """The lowest rank on which `failed` is true, the same on every rank (None: none failed).
    One all-reduce of a flag per rank: cheap enough to run before every step."""
    if not is_initialized() or world_size() == 1:
        return 0 if failed else None
    flags = torch.zeros(world_size(), dtype=torch.int32, device=_collective_device())
    flags[rank()] = int(failed)
    dist.all_reduce(flags)
    failing = flags.nonzero().flatten().tolist()
    return int(failing[0]) if failing else None


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no autograd), e.g. for metrics."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(x)
    return x


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's [n, ...] tensor along dim 0. Backward sums the gradients of all
    ranks for this rank's slice, so a loss computed identically on every rank gets, after the
    data-parallel average, exactly the gradient of the one global loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n, ctx.rank = x.shape[0], rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world·n, ...] in rank order, differentiable. Same n on every rank."""
    if not is_initialized() or world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not is_initialized() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_ints(value: int) -> list[int]:
    """Every rank's integer, in rank order (e.g. each rank's number of valid slots)."""
    if not is_initialized() or world_size() == 1:
        return [value]
    return all_gather_no_grad(torch.tensor([value], dtype=torch.int64, device=_collective_device())).tolist()


class RingTransfer:
    """One asynchronous step around the ring of ranks: optionally send a tensor to the next rank
    and/or receive a tensor from the previous one, while the caller computes. `wait()` returns the
    received tensor. Messages of different kinds travel with different tags so that they cannot be
    matched out of order; every rank must post its transfers in the same order."""

    def __init__(self, send: torch.Tensor | None = None, receive_like: torch.Tensor | None = None, *,
                 tag: int = 0) -> None:
        w, r = world_size(), rank()
        self.received = None if receive_like is None else torch.empty_like(receive_like)
        self._sent = None if send is None else send.contiguous()  # alive until the send completes
        ops = []
        if self._sent is not None:
            ops.append(dist.P2POp(dist.isend, self._sent, (r + 1) % w, tag=tag))
        if self.received is not None:
            ops.append(dist.P2POp(dist.irecv, self.received, (r - 1) % w, tag=tag))
        self._requests = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> torch.Tensor | None:
        for request in self._requests:
            request.wait()
        self._requests, self._sent = [], None
        return self.received
