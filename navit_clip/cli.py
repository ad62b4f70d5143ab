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

    summary = train(load_config(args.config, args.overrides))
    if dist.is_main():
        print(json.dumps(summary, indent=2))
    return summary


def _cmd_eval(args: argparse.Namespace) -> dict:
    from navit_clip.eval.run import run_eval
    from navit_clip.eval.sweep import parse_budgets

    budgets = getattr(args, "budgets", None)
    result = run_eval(args.run, args.shards, tag=args.tag, task=getattr(args, "task", "auto"),
                      templates=getattr(args, "templates", None), budgets=parse_budgets(budgets) if budgets else None,
                      split=getattr(args, "split", "test"), classnames=getattr(args, "classnames", None),
                      out=args.out, overrides=args.overrides)
    for line in result["summary"]:
        print(line)
    for what, path in result["written"].items():
        print(f"  {what:<8} -> {path}")
    return result


def _cmd_export(args: argparse.Namespace) -> dict:
    from navit_clip.export import export_image_encoder
    from navit_clip.train.checkpoint import load_trained_model

    model, cfg, step = load_trained_model(args.run, args.tag)
    with_text = getattr(args, "with_text", False)
    out = export_image_encoder(model, args.out or Path(args.run) / "export", max_tokens_per_image=cfg.data.max_tokens_per_image,
                               seq_len=cfg.data.seq_len, max_images=cfg.data.max_images, with_text=with_text)
    what = "image and text encoders" if with_text else "image encoder"
    print(f"exported the {what} of step {step} to {out} (load with navit_clip.export.load_image_encoder)")
    sequences = getattr(args, "torch_export", 0)
    if sequences:
        import torch

        from navit_clip.export import export_program, load_image_encoder

        program = export_program(load_image_encoder(out), num_sequences=sequences)
        torch.export.save(program, str(out / "image_encoder.pt2"))
        print(f"torch.export program (packed input, {sequences} x {cfg.data.seq_len} tokens) -> {out / 'image_encoder.pt2'}")
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
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="zero-shot classification or retrieval of a training run or an exported encoder")
    p.add_argument("--run", required=True, help="training run directory (train.out_dir) or exported encoder directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--data", "--shards", dest="shards", default=None,
                   help="shards (spec or folder), CLIP_benchmark wds root, image folder or path,caption CSV "
                        "(default: data.eval_shards of the run)")
    p.add_argument("--task", default="auto", choices=("auto", "classification", "retrieval"))
    p.add_argument("--templates", default=None, help="dataset | imagenet | FILE (default: eval.templates)")
    p.add_argument("--classnames", default=None, help="class names file for an image folder, one per line")
    p.add_argument("--split", default="test", help="split folder of a CLIP_benchmark wds root")
    p.add_argument("--budgets", default=None, help="token budgets per image to sweep, e.g. 16,32,64")
    p.add_argument("--out", default=None, help="result JSON, or folder for a sweep (default: RUN/eval/...)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. eval.max_tokens_per_image=32")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export the image encoder as safetensors + config.json")
    p.add_argument("--run", required=True)
    p.add_argument("--tag", default=None)
    p.add_argument("--out", default=None, help="default: RUN/export")
    p.add_argument("--with-text", action="store_true", help="also export the text encoder (zero-shot from the export)")
    p.add_argument("--torch-export", type=int, default=0, metavar="S",
                   help="also write image_encoder.pt2: torch.export of the packed forward at S sequences")
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
    # eval and export name bad inputs (a dataset layout, a model path) with ValueError too
    expected = (ValueError, RuntimeError) if args.command in ("eval", "export") else (ConfigError, ShardError)
    try:
        args.func(args)
    except (*expected, FileNotFoundError) as exc:
        print(f"navit-clip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
