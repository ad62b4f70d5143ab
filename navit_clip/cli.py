"""`navit-clip train | eval | export | make-shards | pack-shards | train-tokenizer | demo | compare`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from navit_clip.compare.command import add_compare_parser
from navit_clip.config import CONFIG_DIR, TOKENIZER_MODELS, load_config
from navit_clip.data.bundled import BUNDLED_DATASETS
from navit_clip.demo import demo_command
from navit_clip.errors import InputError, UserError

# Each command imports what it needs when it runs: only `train` (and `demo`) build a DeepSpeed
# engine, so only they import DeepSpeed.


def make_shards_command(out: str | None = None, train_copies: int = 2, seed: int = 0, images: str | None = None,
                        captions: str | None = None, img2dataset: str | None = None, per_shard: int = 1000,
                        prefix: str = "shard", max_side: int = 0, allow_outside_images: bool = False,
                        overwrite: bool = False, dataset: str = "digits") -> dict:
    """Shards from images + captions or img2dataset output; with neither, the bundled `dataset`."""
    out = out or f"data/{dataset}"
    if images or img2dataset:
        return _make_shards_from_files(out, images, captions, img2dataset, per_shard, prefix, max_side,
                                       allow_outside_images, overwrite)
    from navit_clip.data.bundled import make_bundled
    from navit_clip.data.make_shards import prepare_out_dir

    prepare_out_dir(out, overwrite)
    info, message = make_bundled(dataset, out, seed=seed, train_copies=train_copies)
    print(message)
    return info


def _make_shards_from_files(out: str, images: str | None, captions: str | None, img2dataset: str | None,
                            per_shard: int, prefix: str, max_side: int, allow_outside_images: bool,
                            overwrite: bool) -> dict:
    from navit_clip.data.make_shards import make_shards, read_caption_file, read_image_folder

    if img2dataset:
        entries = list(read_image_folder(img2dataset))
    else:
        if not captions:
            raise InputError("--images needs --captions (a CSV, TSV or JSONL file of image and caption)")
        entries = list(read_caption_file(captions, images, allow_outside_images))
    info = make_shards(iter(entries), out, per_shard=per_shard, prefix=prefix, max_side=max_side, total=len(entries),
                       overwrite=overwrite)
    print(f"wrote {info['num_samples']} samples in {info['num_shards']} shards to {out} ({info['shards']}); "
          f"skipped {sum(info['skipped'].values())}: {info['skipped']}")
    return info


def pack_shards_command(config_path: str, shards: str, out: str, per_shard: int = 256, shuffle_buffer: int = 0,
                        overrides: Sequence[str] = ()) -> dict:
    """Pre-pack raw shards into shards of ready packed sequences."""
    from tqdm import tqdm

    from navit_clip.data.loader import PackedStream
    from navit_clip.data.prepacked import write_packed_shards

    stream = PackedStream(_pack_spec(config_path, shards, shuffle_buffer, overrides))
    batches = tqdm(stream, desc="pack-shards", unit="batch")
    skipped: dict = {}

    def counted():
        for batch in batches:
            for reason, n in batch.skipped_by_reason.items():
                skipped[reason] = skipped.get(reason, 0) + n
            yield batch

    paths = write_packed_shards(counted(), str(Path(out) / "packed-%06d.tar"), per_shard)
    spec_out = str(Path(out) / f"packed-{{000000..{len(paths) - 1:06d}}}.tar")
    print(f"wrote {len(paths)} pre-packed shards to {out} ({spec_out}); skipped samples: {skipped}. "
          f"Train on them with data.train_shards='{spec_out}' and the same model, seq_len and max_images.")
    return {"shards": spec_out, "num_shards": len(paths), "skipped": skipped}


def _pack_spec(config_path: str, shards: str, shuffle_buffer: int, overrides: Sequence[str]):
    from dataclasses import replace

    from navit_clip.data.spec import stream_spec

    spec = stream_spec(load_config(config_path, overrides))
    return replace(spec, shards=shards, loop=False, shuffle_buffer=shuffle_buffer,
                   sources=replace(spec.sources, resampled=False, shard_kind="raw"))


def train_tokenizer_command(shards: str, vocab_size: int, out: str, model_type: str = "unigram",
                            max_samples: int = 1_000_000, allow_pipe: bool = False) -> dict:
    """A SentencePiece tokenizer trained on the captions of shards."""
    from navit_clip.data.tokenizer_training import train_tokenizer

    info = train_tokenizer(shards, vocab_size, out, model_type=model_type, max_samples=max_samples,
                           allow_pipe=allow_pipe)
    print(f"trained a {info['model_type']} tokenizer of {info['vocab_size']} pieces on {info['captions']} captions "
          f"-> {info['tokenizer']}; skipped {sum(info['skipped'].values())}: {info['skipped']}. "
          f"Train with model.text.tokenizer={info['tokenizer']}")
    return info


def train_command(config_path: str, overrides: Sequence[str] = (), resume: str | None = None) -> dict:
    """Train under DeepSpeed; `resume` latest | never is train.resume spelled as a flag, stepN
    resumes from that checkpoint."""
    from navit_clip import dist
    from navit_clip.train.loop import train

    overrides = list(overrides)
    if resume:
        overrides.append(f"train.resume={resume != 'never'}")
    tag = None if resume in (None, "latest", "never") else resume
    summary = train(load_config(config_path, overrides), resume_tag=tag)
    if dist.is_main():
        print(json.dumps(summary, indent=2))
    return summary


def eval_command(run: str, shards: str | None = None, tag: str | None = None, task: str = "auto",
                 templates: str | None = None, classnames: str | None = None, split: str = "test",
                 budgets: str | None = None, out: str | None = None, overrides: Sequence[str] = (),
                 train_data: str | None = None) -> dict:
    """Zero-shot classification, retrieval or a linear probe; prints one summary line per budget."""
    from navit_clip.eval.run import run_eval
    from navit_clip.eval.sweep import parse_budgets

    result = run_eval(run, shards, tag=tag, task=task, templates=templates,
                      budgets=parse_budgets(budgets) if budgets else None, split=split, classnames=classnames,
                      out=out, overrides=overrides, train_data=train_data)
    for line in result["summary"]:
        print(line)
    for what, path in result["written"].items():
        print(f"  {what:<8} -> {path}")
    return result


def export_command(run: str, tag: str | None = None, out: str | None = None, with_text: bool = False,
                   torch_export: int = 0, overwrite: bool = False) -> dict:
    """Export the image encoder (and the text encoder) of a run; optionally a torch.export program."""
    from navit_clip.export import export_image_encoder
    from navit_clip.train.checkpoint import load_trained_model

    model, cfg, step = load_trained_model(run, tag)
    path = export_image_encoder(model, out or Path(run) / "export", max_tokens_per_image=cfg.data.resolution.max_tokens,
                                seq_len=cfg.data.seq_len, max_images=cfg.data.max_images, with_text=with_text,
                                overwrite=overwrite, resolution=cfg.data.resolution)
    what = "image and text encoders" if with_text else "image encoder"
    print(f"exported the {what} of step {step} to {path} (load with navit_clip.export.load_image_encoder)")
    if torch_export:
        import torch

        from navit_clip.export import PROGRAM_FILE, load_image_encoder
        from navit_clip.export_program import export_program

        program = export_program(load_image_encoder(path), num_sequences=torch_export)
        torch.export.save(program, str(path / PROGRAM_FILE))
        print(f"torch.export program (packed input, {torch_export} x {cfg.data.seq_len} tokens) -> "
              f"{path / PROGRAM_FILE}")
    return {"export": str(path), "step": step}


def build_parser() -> argparse.ArgumentParser:
    """The command table: each sub-command's options are the keyword arguments of its handler."""
    parser = argparse.ArgumentParser(prog="navit-clip", description=__doc__)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True)
    default_config = str(CONFIG_DIR / "default.yaml")

    p = sub.add_parser("train", help="train under DeepSpeed (1 process, or N via the deepspeed launcher)")
    p.add_argument("--config", dest="config_path", default=default_config)
    p.add_argument("--resume", default=None, metavar="latest|never|stepN",
                   help="latest: continue from the last complete checkpoint in train.out_dir (the default); "
                        "never: refuse a train.out_dir that holds checkpoints; stepN: continue from that checkpoint")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(handler=train_command)

    p = sub.add_parser("eval", help="zero-shot classification, retrieval or linear probe of a run or an export")
    p.add_argument("--run", required=True, help="training run directory (train.out_dir) or exported encoder directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--data", "--shards", dest="shards", default=None,
                   help="shards (spec or folder), CLIP_benchmark wds root, image folder or path,caption CSV "
                        "(default: data.eval_shards of the run)")
    p.add_argument("--task", default="auto", choices=("auto", "classification", "retrieval", "linear_probe"))
    p.add_argument("--train-data", default=None, help="linear_probe: labelled images to fit on (docs/eval.md)")
    p.add_argument("--templates", default=None, help="dataset | imagenet | FILE (default: eval.templates)")
    p.add_argument("--classnames", default=None, help="class names file for an image folder, one per line")
    p.add_argument("--split", default="test", help="split folder of a CLIP_benchmark wds root")
    p.add_argument("--budgets", default=None, help="token budgets per image to sweep, e.g. 16,32,64")
    p.add_argument("--out", default=None, help="result JSON, or folder for a sweep (default: RUN/eval/...)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. eval.max_tokens_per_image=32")
    p.set_defaults(handler=eval_command)

    p = sub.add_parser("export", help="export the image encoder as safetensors + config.json")
    p.add_argument("--run", required=True)
    p.add_argument("--tag", default=None)
    p.add_argument("--out", default=None, help="default: RUN/export")
    p.add_argument("--with-text", action="store_true", help="also export the text encoder (zero-shot from the export)")
    p.add_argument("--torch-export", type=int, default=0, metavar="S",
                   help="also write image_encoder.pt2: torch.export of the packed forward at S sequences")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(handler=export_command)

    p = sub.add_parser("make-shards", help="WebDataset shards from images + captions, img2dataset output, "
                                            "or (with no input) a bundled dataset")
    p.add_argument("--out", default=None, help="output folder (default: data/<dataset>)")
    p.add_argument("--dataset", default="digits", choices=BUNDLED_DATASETS, help="with no input: the set to build")
    p.add_argument("--train-copies", type=int, default=2, help="digits: renderings of each training digit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", default=None, help="folder of images named by --captions")
    p.add_argument("--captions", default=None, help="CSV/TSV/JSONL with an image file column and a caption column")
    p.add_argument("--img2dataset", default=None, help="img2dataset `files` output (image + .txt + .json)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--max-side", type=int, default=0, help="shrink larger images to this side (0: keep native)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="read caption-file paths that are absolute or lead outside --images")
    p.add_argument("--overwrite", action="store_true", help="remove shards an earlier run left in --out")
    p.set_defaults(handler=make_shards_command)

    p = sub.add_parser("pack-shards", help="pre-pack raw shards into shards of ready packed sequences")
    p.add_argument("--config", dest="config_path", default=default_config)
    p.add_argument("--shards", required=True, help="raw shard spec to pack")
    p.add_argument("--out", required=True)
    p.add_argument("--per-shard", type=int, default=256, help="sequences per output shard")
    p.add_argument("--shuffle-buffer", type=int, default=0, help="shuffle samples before packing")
    p.add_argument("overrides", nargs="*", help="key.sub=value (patch size, seq_len, max_images, resolution, ...)")
    p.set_defaults(handler=pack_shards_command)

    p = sub.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on the captions of shards")
    p.add_argument("--shards", required=True, help="shard spec, e.g. data/x/train-{000000..000007}.tar")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="folder for tokenizer.model (and tokenizer.json)")
    p.add_argument("--model-type", choices=TOKENIZER_MODELS, default="unigram")
    p.add_argument("--max-samples", type=int, default=1_000_000, help="captions to train on at most (0: all)")
    p.add_argument("--allow-pipe", action="store_true", help="allow `pipe:` shard URLs (they run shell commands)")
    p.set_defaults(handler=train_tokenizer_command)

    p = sub.add_parser("demo", help="make the default dataset, train, evaluate zero-shot and export")
    p.add_argument("--config", dest="config_path", default=default_config)
    p.add_argument("--data", default="data/digits")
    p.add_argument("--out", default="runs/default")
    p.add_argument("overrides", nargs="*", help="key.sub=value for training")
    p.set_defaults(handler=demo_command)
    add_compare_parser(sub)
    return parser


def parse_command_line(argv: list[str] | None = None) -> dict:
    """The options of one command as its handler's keyword arguments. Overrides may come before
    and after options (`train a=1 --resume never b=2`): argparse gives a `nargs="*"` positional
    only its first run of words, so later runs are appended to it here."""
    parser = build_parser()
    namespace, extras = parser.parse_known_args(argv)
    options = vars(namespace)
    stray = [word for word in extras if word.startswith("-") or "overrides" not in options]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras:
        options["overrides"] = [*options["overrides"], *extras]
    return options


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error the user can fix (UserError) is one line on stderr and exit
    status 2; anything else is a bug and keeps its traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    options = parse_command_line(argv)
    command, handler = options.pop("command"), options.pop("handler")
    options.pop("local_rank")
    try:
        handler(**options)
    except UserError as exc:
        print(f"navit-clip {command}: error: {exc}", file=sys.stderr, flush=True)
        exc.reported()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
