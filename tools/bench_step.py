"""Time of one training step of navit-clip against open_clip's model at equal image tokens, in one run.

Ours: the training step itself (`train/step.py`: forward, the chunked loss, backward and the
optimizer step through the DeepSpeed engine that `train` builds) on packed batches of the
bundled digits, read by the training loader before timing starts. open_clip: `open_clip.CLIP`
with the same widths and depths (a square image of `max_tokens` patches plus its class token, one
image per row, as many images as our step has token slots), `open_clip.loss.ClipLoss` and
`torch.optim.AdamW` with open_clip_train's parameter groups, then its `logit_scale` clamp: what
one step of `open_clip_train` runs once its batch is in memory.

The two take turns step by step (`--steps` timed steps each) so that drift of a shared machine
hits both alike; the median step times, their ratio and the median of the step-by-step ratios
are printed.

    python tools/bench_step.py                        # configs/default.yaml
    python tools/bench_step.py model.vision.attention=sdpa --steps 60 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from navit_clip.config import Config, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def digit_batches(cfg: Config, count: int, directory: Path) -> list:
    """`count` packed training batches of a small digits set, read by the training loader."""
    from dataclasses import replace

    from navit_clip.data.digits import make_digit_shards
    from navit_clip.data.loader import make_loader
    from navit_clip.data.spec import stream_spec

    info = make_digit_shards(directory, train_copies=1, max_train_digits=1000, eval_per_class=1,
                             shards_train=2, shards_eval=1)
    spec = replace(stream_spec(cfg), shards=info["train_shards"])
    return list(itertools.islice(iter(make_loader(spec, num_workers=0)), count))


def our_step(cfg: Config, batches: list):
    """-> a function running one training step of ours (train_step over the cycled batches)."""
    from navit_clip import dist
    from navit_clip.train.engine import build_engine
    from navit_clip.train.step import train_step

    dist.init_distributed()
    engine, _, _ = build_engine(cfg)
    stream, stop, counter = itertools.cycle(batches), argparse.Namespace(requested=False), itertools.count()
    return lambda: train_step(engine, stream, cfg, stop, next(counter), None)


def open_clip_step(cfg: Config, images: int):
    """-> a function running one open_clip training step on `images` square images and captions."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    v, t, o = cfg.model.vision, cfg.model.text, cfg.optim
    side = math.isqrt(cfg.data.resolution.max_tokens) * v.patch_size
    vision = CLIPVisionCfg(layers=v.depth, width=v.width, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio,
                           patch_size=v.patch_size, image_size=side)
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.depth, mlp_ratio=t.mlp_ratio)
    torch.manual_seed(cfg.train.seed)
    model = open_clip.CLIP(embed_dim=cfg.model.embed_dim, vision_cfg=vision, text_cfg=text)
    # open_clip_train's groups: no decay for gains, biases, embeddings and logit_scale
    exclude = [p for n, p in model.named_parameters() if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
               or "logit_scale" in n]
    rest = [p for p in model.parameters() if all(p is not q for q in exclude)]
    optimizer = torch.optim.AdamW([{"params": exclude, "weight_decay": 0.0}, {"params": rest, "weight_decay": o.weight_decay}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    loss_fn = open_clip.loss.ClipLoss()
    pixels = torch.randn(images, 3, side, side)
    tokens = torch.randint(1, t.vocab_size - 1, (images, t.context_length))
    tokens[:, -1] = t.vocab_size - 1  # the end token (open_clip pools at the argmax)

    def step() -> None:
        optimizer.zero_grad()
        image_features, text_features, logit_scale = model(pixels, tokens)
        loss_fn(image_features, text_features, logit_scale).backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def timed(step) -> float:
    """Seconds of one step."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each side first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("navit_clip.model.attention").setLevel(logging.INFO)  # what `auto` picked
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    slots = cfg.data.sequences_per_batch * cfg.data.seq_len
    images = slots // cfg.data.resolution.max_tokens
    with tempfile.TemporaryDirectory() as tmp:
        batches = digit_batches(cfg, 20, Path(tmp))
    real = statistics.mean(int((b.segment >= 0).sum()) for b in batches)
    per_step = statistics.mean(b.num_images for b in batches)
    print(f"ours: {cfg.data.sequences_per_batch}x{cfg.data.seq_len} packed token slots ({real:.0f} image tokens, "
          f"{per_step:.1f} images per step); open_clip: {images} images x {cfg.data.resolution.max_tokens} "
          f"tokens (+1 class token each); {torch.get_num_threads()} threads")
    sides = {"ours": our_step(cfg, batches), "open_clip": open_clip_step(cfg, images)}
    for _ in range(args.warmup):
        for step in sides.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.steps):  # one step each in turn: drift of a shared machine hits both alike
        for name, step in sides.items():
            times[name].append(timed(step))
    for name, values in times.items():
        print(f"{name:>10}: median {statistics.median(values) * 1e3:7.1f} ms/step, "
              f"quartiles {' / '.join(f'{q * 1e3:.0f}' for q in statistics.quantiles(values, n=4))} ms")
    pairs = [a / b for a, b in zip(*times.values())]
    print(f"ratio ours / open_clip: {statistics.median(times['ours']) / statistics.median(times['open_clip']):.2f} "
          f"(median of step-by-step ratios {statistics.median(pairs):.2f})")

if __name__ == "__main__":
    main()
