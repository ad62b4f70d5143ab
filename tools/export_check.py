"""Check an export against the training run it came from, on real evaluation images: the largest
difference between the exported encoder's embeddings and the training model's, and between the
torch.export program and eager, plus the export's size and load time.

    python tools/export_check.py --run runs/default --export runs/default/export --images 200
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from navit_clip.data.loader import PackedStream  # noqa: E402
from navit_clip.data.spec import evaluation_spec  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--export", required=True)
    parser.add_argument("--images", type=int, default=200, help="evaluation images to compare on (about)")
    args = parser.parse_args()

    from navit_clip.export import load_image_encoder
    from navit_clip.export_program import export_program
    from navit_clip.train.checkpoint import load_trained_model

    start = time.perf_counter()
    encoder = load_image_encoder(args.export)
    load_s = time.perf_counter() - start
    model, cfg, step = load_trained_model(args.run)
    spec = evaluation_spec(cfg)
    program = export_program(encoder, num_sequences=cfg.eval.sequences_per_batch).module()
    worst_export = worst_program = 0.0
    seen = traced_images = 0
    with torch.no_grad():
        for batch in itertools.takewhile(lambda _: seen < args.images, PackedStream(spec)):
            valid = batch.valid.flatten()
            expected = model.encode_image_slots(batch)[valid]
            worst_export = max(worst_export, float((encoder(batch) - expected).abs().max()))
            if batch.num_sequences == cfg.eval.sequences_per_batch:
                traced = program(batch.patches, batch.coords, batch.segment).flatten(0, 1)[valid]
                worst_program = max(worst_program, float((traced - expected).abs().max()))
                traced_images += int(valid.sum())
            seen += int(valid.sum())
    size = sum(p.stat().st_size for p in Path(args.export).glob("*.safetensors"))
    print(f"export {args.export} (step {step}): {size / 1e6:.2f} MB, loaded in {load_s:.2f} s")
    print(f"{seen} evaluation images: max |exported - training| = {worst_export:.2e} (fp32, {encoder.proj.weight.device})")
    print(f"{traced_images} of them in full batches: max |torch.export program - training| = "
          + (f"{worst_program:.2e}" if traced_images else "n/a (no full batch)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
