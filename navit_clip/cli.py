"""`navit-clip train | eval | export | make-shards | demo`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from navit_clip.config import CONFIG_DIR, ConfigError, load_config
from navit_clip.data.shards import ShardError


def _cmd_make_shards(args: argparse.Namespace) -> dict:
    from navit_clip.data.digits import make_digit_shards

    info = make_digit_shards(args.out, train_copies=args.train_copies, seed=args.seed)
    print(f"wrote {info['num_train']} training and {info['num_eval']} evaluation samples to {args.out}")
    return info


def _cmd_train(args: argparse.Namespace) -> dict:
    from navit_clip import dist
    from navit_clip.train.loop import train

    overrides = list(args.overrides)
    if getattr(args, "resume", None):  # --resume latest|never: train.resume, spelled as a flag
        overrides.append(f"train.resume={args.resume == 'latest'}")
    summary = train(load_config(args.config, overrides))
    if dist.is_main():
        print(json.dumps(summary, indent=2))
    return summary


def _cmd_eval(args: argparse.Namespace) -> dict:
    import torch

    from navit_clip.config import apply_overrides
    from navit_clip.eval.zeroshot import evaluate, load_task
    from navit_clip.train.checkpoint import load_trained_model

    model, cfg, step = load_trained_model(args.run, args.tag)
    apply_overrides(cfg, args.overrides)
    shards = args.shards or cfg.data.eval_shards
    task = load_task(shards, cfg.eval.templates)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"run": str(args.run), "step": step, "shards": shards, "templates": cfg.eval.templates,
              **evaluate(model.to(device), task, cfg, device=device)}
    out = Path(args.out or Path(args.run) / "eval" / "zeroshot.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"zero-shot on {result['num_images']} images ({result['num_classes']} classes, chance "
          f"{result['chance_acc1']:.1%}): acc1 {result['acc1']:.1%}  acc5 {result['acc5']:.1%}  -> {out}")
    return result


def _cmd_export(args: argparse.Namespace) -> dict:
    from navit_clip.export import export_image_encoder
    from navit_clip.train.checkpoint import load_trained_model

    model, cfg, step = load_trained_model(args.run, args.tag)
    out = export_image_encoder(model, args.out or Path(args.run) / "export", max_tokens_per_image=cfg.data.max_tokens_per_image,
                               seq_len=cfg.data.seq_len, max_images=cfg.data.max_images)
    print(f"exported the image encoder of step {step} to {out} (load with navit_clip.export.load_image_encoder)")
    return {"export": str(out), "step": step}


def _cmd_demo(args: argparse.Namespace) -> dict:
    """The bundled default, end to end: dataset, training under DeepSpeed, zero-shot eval, export."""
    started = time.perf_counter()
    data_dir = Path(args.data)
    if not (data_dir / "dataset.json").exists():
        _cmd_make_shards(argparse.Namespace(out=str(data_dir), train_copies=2, seed=0))
    info = json.loads((data_dir / "dataset.json").read_text())
    overrides = [f"data.train_shards={info['train_shards']}", f"data.eval_shards={info['eval_shards']}",
                 f"train.out_dir={args.out}", *args.overrides]
    _cmd_train(argparse.Namespace(config=args.config, overrides=overrides))
    result = _cmd_eval(argparse.Namespace(run=args.out, tag=None, shards=None, out=None, overrides=[]))
    export = _cmd_export(argparse.Namespace(run=args.out, tag=None, out=None))
    print("\nnavit-clip demo finished in {:.0f} s".format(time.perf_counter() - started))
    print(f"  dataset      {data_dir}")
    print(f"  run          {args.out}  (config.json, metrics.jsonl, checkpoints/)")
    print(f"  zero-shot    acc1 {result['acc1']:.1%}, acc5 {result['acc5']:.1%} (chance {result['chance_acc1']:.0%})"
          f"  -> {args.out}/eval/zeroshot.json")
    print(f"  encoder      {export['export']}")
    return {"eval": result, **export}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="navit-clip", description=__doc__)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True)
    default_config = str(CONFIG_DIR / "default.yaml")

    p = sub.add_parser("train", help="train under DeepSpeed (1 process, or N via the deepspeed launcher)")
    p.add_argument("--config", default=default_config)
    p.add_argument("--resume", choices=["latest", "never"], default=None,
                   help="latest: continue from the last complete checkpoint in train.out_dir (the default); "
                        "never: refuse a train.out_dir that holds checkpoints")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="zero-shot classification of a training run's latest checkpoint")
    p.add_argument("--run", required=True, help="training run directory (train.out_dir)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--shards", default=None, help="evaluation shards (default: data.eval_shards)")
    p.add_argument("--out", default=None, help="result JSON (default: RUN/eval/zeroshot.json)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. eval.max_tokens_per_image=32")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export the image encoder as safetensors + config.json")
    p.add_argument("--run", required=True)
    p.add_argument("--tag", default=None)
    p.add_argument("--out", default=None, help="default: RUN/export")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("make-shards", help="build the bundled digits dataset as WebDataset shards")
    p.add_argument("--out", default="data/digits")
    p.add_argument("--train-copies", type=int, default=2, help="renderings of each training digit")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_shards)

    p = sub.add_parser("demo", help="make the default dataset, train, evaluate zero-shot and export")
    p.add_argument("--config", default=default_config)
    p.add_argument("--data", default="data/digits")
    p.add_argument("--out", default="runs/default")
    p.add_argument("overrides", nargs="*", help="key.sub=value for training")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, ShardError, FileNotFoundError) as exc:
        print(f"navit-clip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
