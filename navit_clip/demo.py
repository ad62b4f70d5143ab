"""`navit-clip demo`: the bundled default end to end, from an empty folder to an export."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence


def demo_command(config_path: str, data: str, out: str, overrides: Sequence[str] = ()) -> dict:
    """The bundled default, end to end: dataset, training under DeepSpeed, zero-shot eval, export."""
    from navit_clip.cli import eval_command, export_command, make_shards_command, train_command

    started = time.perf_counter()
    data_dir = Path(data)
    if not (data_dir / "dataset.json").exists():
        make_shards_command(str(data_dir), train_copies=2, seed=0)
    info = json.loads((data_dir / "dataset.json").read_text())
    train_command(config_path, [f"data.train_shards={info['train_shards']}", f"data.eval_shards={info['eval_shards']}",
                                f"train.out_dir={out}", *overrides])
    result = eval_command(out)
    export = export_command(out, overwrite=True)  # the run's own export folder: replaced by the new one
    print("\nnavit-clip demo finished in {:.0f} s".format(time.perf_counter() - started))
    print(f"  dataset      {data_dir}")
    print(f"  run          {out}  (config.json, metrics.jsonl, checkpoints/)")
    print(f"  zero-shot    acc1 {result['acc1']:.1%}, acc5 {result['acc5']:.1%} (chance {result['chance_acc1']:.0%})"
          f"  -> {out}/eval/zeroshot.json")
    print(f"  encoder      {export['export']}")
    return {"eval": result, **export}
