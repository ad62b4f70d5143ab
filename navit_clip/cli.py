"""`navit-clip train | eval | export | make-shards | pack-shards | demo`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from navit_clip.config import CONFIG_DIR, ConfigError, load_config
from navit_clip.data.make_shards import InputError
from navit_clip.data.shards import ShardError


def _cmd_make_shards(args: argparse.Namespace) -> dict:
    if getattr(args, "images", None) or getattr(args, "img2dataset", None):
        return _make_shards_from_files(args)
    from navit_clip.data.digits import make_digit_shards

    info = make_digit_shards(args.out, train_copies=args.train_copies, seed=args.seed)
    print(f"wrote {info['num_train']} training and {info['num_eval']} evaluation samples to {args.out}")
    return info


def _make_shards_from_files(args: argparse.Namespace) -> dict:
    from navit_clip.data.make_shards import make_shards, read_caption_file, read_image_folder

    if args.img2dataset:
        entries = list(read_image_folder(args.img2dataset))
    else:
        if not args.captions:
            raise FileNotFoundError("--images needs --captions (a CSV, TSV or JSONL file of image and caption)")
        entries = list(read_caption_file(args.captions, args.images))
    info = make_shards(iter(entries), args.out, per_shard=args.per_shard, prefix=args.prefix,
                       max_side=args.max_side, total=len(entries))
    print(f"wrote {info['num_samples']} samples in {info['num_shards']} shards to {args.out} ({info['shards']}); "
          f"skipped {sum(info['skipped'].values())}: {info['skipped']}")
    return info


def _cmd_pack_shards(args: argparse.Namespace) -> dict:
    from dataclasses import replace

    from tqdm import tqdm

    from navit_clip.data.loader import PackedStream
    from navit_clip.data.prepacked import write_packed_shards
    from navit_clip.data.spec import stream_spec

    cfg = load_config(args.config, args.overrides)
    spec = stream_spec(cfg)
    spec = replace(spec, shards=args.shards, loop=False, shuffle_buffer=args.shuffle_buffer,
                   sources=replace(spec.sources, resampled=False, shard_kind="raw"))
    stream = PackedStream(spec)
    batches = tqdm(stream, desc="pack-shards", unit="batch")
    skipped: dict = {}

    def counted():
        for batch in batches:
            for reason, n in batch.skipped_by_reason.items():
                skipped[reason] = skipped.get(reason, 0) + n
            yield batch

    paths = write_packed_shards(counted(), str(Path(args.out) / "packed-%06d.tar"), args.per_shard)
    spec_out = str(Path(args.out) / f"packed-{{000000..{len(paths) - 1:06d}}}.tar")
    print(f"wrote {len(paths)} pre-packed shards to {args.out} ({spec_out}); skipped samples: {skipped}. "
          f"Train on them with data.train_shards='{spec_out}' and the same model, seq_len and max_images.")
    return {"shards": spec_out, "num_shards": len(paths), "skipped": skipped}


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
    out = export_image_encoder(model, args.out or Path(args.run) / "export", max_tokens_per_image=cfg.data.resolution.max_tokens,
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
    p.add_argument("--resume", choices=["latest", "never"], default=None,
                   help="latest: continue from the last complete checkpoint in train.out_dir (the default); "
                        "never: refuse a train.out_dir that holds checkpoints")
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

    p = sub.add_parser("make-shards", help="WebDataset shards from images + captions, img2dataset output, "
                                            "or (with no input) the bundled digits dataset")
    p.add_argument("--out", default="data/digits")
    p.add_argument("--train-copies", type=int, default=2, help="digits: renderings of each training digit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", default=None, help="folder of images named by --captions")
    p.add_argument("--captions", default=None, help="CSV/TSV/JSONL with an image file column and a caption column")
    p.add_argument("--img2dataset", default=None, help="img2dataset `files` output (image + .txt + .json)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--max-side", type=int, default=0, help="shrink larger images to this side (0: keep native)")
    p.set_defaults(func=_cmd_make_shards)

    p = sub.add_parser("pack-shards", help="pre-pack raw shards into shards of ready packed sequences")
    p.add_argument("--config", default=default_config)
    p.add_argument("--shards", required=True, help="raw shard spec to pack")
    p.add_argument("--out", required=True)
    p.add_argument("--per-shard", type=int, default=256, help="sequences per output shard")
    p.add_argument("--shuffle-buffer", type=int, default=0, help="shuffle samples before packing")
    p.add_argument("overrides", nargs="*", help="key.sub=value (patch size, seq_len, max_images, resolution, ...)")
    p.set_defaults(func=_cmd_pack_shards)

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
    expected = (ValueError, RuntimeError) if args.command in ("eval", "export") else (ConfigError, ShardError, InputError)
    try:
        args.func(args)
    except (*expected, FileNotFoundError) as exc:
        print(f"navit-clip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
