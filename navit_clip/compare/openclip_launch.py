"""Run open_clip's own trainer on navit-clip shards: `python -m navit_clip.compare.openclip_launch
MODEL_CONFIG.json -- <open_clip_train.main arguments>`.

Two things are done before handing over to `open_clip_train.main.main`: the model config JSON is
added to open_clip's registry (its file name, without .json, is the `--model` name), and the shard
reader is made to skip the empty sample that webdataset 1.0 yields at the end of each tar file
(it has no `fname`; open_clip_train's `group_by_keys_nothrow` would fail on it with a KeyError)."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator


def skip_nameless(data: Iterable[dict]) -> Iterator[dict]:
    """The file entries of a tar stream without the end-of-shard marker that carries no file name."""
    for entry in data:
        if "fname" in entry:
            yield entry


def install_shim() -> None:
    """Route open_clip_train's grouping of tar entries through `skip_nameless` (idempotent)."""
    import open_clip_train.data as data

    original = data.group_by_keys_nothrow
    if getattr(original, "skips_nameless", False):
        return

    def grouped(entries, *args, **kwargs):
        return original(skip_nameless(entries), *args, **kwargs)

    grouped.skips_nameless = True
    data.group_by_keys_nothrow = grouped


def main(argv: list[str]) -> None:
    import open_clip
    from open_clip_train.main import main as train_main

    config, args = argv[0], argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    open_clip.add_model_config(config)
    install_shim()
    train_main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
