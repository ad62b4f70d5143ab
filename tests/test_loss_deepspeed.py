"""The loss's gradient convention under a real DeepSpeed engine: two gloo ranks, each holding half
of a padded global batch, train a small model for a few SGD steps; the parameters must equal a
single process training the same model on the whole batch with the plain full-matrix loss.
This is the check that gradients are neither averaged twice nor left summed (open_clip #616)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from navit_clip.loss import contrastive_loss, reference_contrastive_loss

from processes import free_port, spawn_and_wait

pytestmark = pytest.mark.slow

WORLD, N, STEPS, LR = 2, 6, 3, 0.5
VALID = torch.tensor([1, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1], dtype=torch.bool)  # both ranks padded


class Towers(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(5, 8)
        self.text = nn.Linear(4, 8)
        self.log_scale = nn.Parameter(torch.tensor([1.5]))
        self.bias = nn.Parameter(torch.tensor([-2.0])) if kind == "sigmoid" else None

    def forward(self, x_img, x_txt):
        return F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1)


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(WORLD * N, 5, generator=g), torch.randn(WORLD * N, 4, generator=g)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    from navit_clip import dist

    dist.init_distributed()
    sl = slice(rank * N, (rank + 1) * N)
    results = {}
    for kind in ("softmax", "sigmoid"):
        for stage in (0, 1):
            model = Towers(kind)
            config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                      "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
                      "zero_allow_untested_optimizer": True}
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                              config=config)
            for step in range(STEPS):
                x_img, x_txt = batch(step)
                image, text = engine(x_img[sl], x_txt[sl])
                loss = contrastive_loss(image, text, VALID[sl], model.log_scale.exp().squeeze(0),
                                        None if model.bias is None else model.bias.squeeze(0), kind=kind, chunk_size=2)
                engine.backward(loss)
                engine.step()
            results[(kind, stage)] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dist.barrier()
    torch.save(results, Path(out) / f"rank{rank}.pt")



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss_ds")
    # the first DeepSpeed start may compile its CPU comm op
    spawn_and_wait(_worker, (free_port(), str(out)), WORLD, 400, "DeepSpeed loss workers")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(kind: str) -> dict[str, torch.Tensor]:
    model = Towers(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        image, text = model(*batch(step))
        loss = reference_contrastive_loss(image, text, VALID, model.log_scale.exp().squeeze(0),
                                          None if model.bias is None else model.bias.squeeze(0), kind=kind)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_deepspeed_data_parallel_training_equals_one_process_on_the_whole_batch(trained, kind, stage):
    expected = single_process(kind)
    start = Towers(kind).state_dict()
    for rank, res in enumerate(trained):
        got = res[(kind, stage)]
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=f"rank {rank} {name}")
            assert not torch.equal(got[name], start[name]), f"{name} never moved"
