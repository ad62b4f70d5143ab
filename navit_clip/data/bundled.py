"""The datasets navit-clip builds from data inside installed wheels (`navit-clip make-shards
--dataset NAME`): each writes train and test shards and a `dataset.json` that evaluation reads."""

from __future__ import annotations

from pathlib import Path

from navit_clip.errors import InputError

BUNDLED_DATASETS = ("digits", "objects")  # navit_clip/data/digits.py, navit_clip/data/objects.py


def make_bundled(dataset: str, out: str | Path, *, seed: int = 0, train_copies: int = 2) -> tuple[dict, str]:
    """Build `dataset` into `out` -> (dataset.json's content, a line saying what was written).
    `train_copies` (renderings of each training digit) is the digits set's alone."""
    if dataset == "objects":
        from navit_clip.data.objects import make_object_shards

        info = make_object_shards(out, seed=seed)
        return info, (f"wrote {info['num_train']} training, {info['num_eval']} single-object evaluation and "
                      f"{info['num_retrieval']} retrieval samples to {out}")
    if dataset == "digits":
        from navit_clip.data.digits import make_digit_shards

        info = make_digit_shards(out, train_copies=train_copies, seed=seed)
        return info, f"wrote {info['num_train']} training and {info['num_eval']} evaluation samples to {out}"
    raise InputError(f"unknown bundled dataset {dataset!r} (one of {', '.join(BUNDLED_DATASETS)})")
