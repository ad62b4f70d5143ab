"""The exported image encoder: same embeddings as the training model, any image size, feature grids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from navit_clip.config import ModelConfig, TextConfig, VisionConfig
from navit_clip.data.packing import PatchedImage, pack
from navit_clip.data.patches import patchify
from navit_clip.data.resolution import fit_grid
from navit_clip.export import export_image_encoder, load_image_encoder
from navit_clip.model.clip import NaViTCLIP

VISION = VisionConfig(patch_size=4, width=32, depth=2, heads=2, max_grid_side=16)


@pytest.fixture(scope="module")
def trained_and_exported(tmp_path_factory):
    torch.manual_seed(0)
    model = NaViTCLIP(ModelConfig(vision=VISION, text=TextConfig(width=32, depth=1, heads=2, context_length=8),
                                  embed_dim=24)).eval()
    with torch.no_grad():  # move weights off their init so a wrong tensor mapping cannot pass
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = export_image_encoder(model, tmp_path_factory.mktemp("enc"), max_tokens_per_image=40, seq_len=64,
                                max_images=4)
    return model, path


def random_images(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(3, 20, 60), (3, 50, 12), (3, 16, 16), (1, 30, 30), (3, 9, 41)]
    return [torch.randint(0, 256, s, generator=gen, dtype=torch.uint8) for s in sizes]


def training_path_embedding(model: NaViTCLIP, image: torch.Tensor) -> torch.Tensor:
    """The training model's embedding of one image packed alone by the data pipeline."""
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).convert("RGB")
    rows, cols = fit_grid(pil.width, pil.height, VISION.patch_size, 40, VISION.max_grid_side)
    patches, coords = patchify(pil, rows, cols, VISION.patch_size)
    batch = pack([PatchedImage("x", patches, coords, (rows, cols), np.zeros(1, np.int64))], 64, 4)
    with torch.no_grad():
        return model.encode_image_slots(batch)[batch.valid.flatten()][0]


def test_files_and_config(trained_and_exported):
    _, path = trained_and_exported
    config = json.loads((path / "config.json").read_text())
    assert config["vision"]["patch_size"] == 4 and config["embed_dim"] == 24 and config["seq_len"] == 64
    assert (path / "model.safetensors").stat().st_size > 0


def test_exported_encoder_is_the_image_tower_with_its_own_state(trained_and_exported):
    """The export is the image tower's own state dict, loaded into the same class: equal key for
    key and value for value, and the same embeddings as the training model on one PackedBatch."""
    from navit_clip.model.towers import ImageTower

    model, path = trained_and_exported
    encoder = load_image_encoder(path)
    assert isinstance(encoder, ImageTower)
    want, got = model.image.state_dict(), encoder.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    batch = encoder.pack_images(random_images(5))
    with torch.no_grad():
        torch.testing.assert_close(encoder(batch), model.encode_image_slots(batch)[batch.valid.flatten()],
                                   atol=0, rtol=0)
    config = json.loads((path / "config.json").read_text())
    assert config["format_version"] == 3 and config["weights"] == {"image": "model.safetensors", "text": None}
    assert not (path / "text.safetensors").exists()


def test_list_of_images_matches_training_model_in_input_order(trained_and_exported):
    model, path = trained_and_exported
    encoder = load_image_encoder(path)
    images = random_images()
    with torch.no_grad():
        got = encoder(images)
    assert got.shape == (len(images), 24)
    for i, image in enumerate(images):
        torch.testing.assert_close(got[i], training_path_embedding(model, image), atol=1e-5, rtol=1e-5)


def test_float_images_in_unit_range_equal_uint8(trained_and_exported):
    encoder = load_image_encoder(trained_and_exported[1])
    images = random_images(1)
    with torch.no_grad():
        torch.testing.assert_close(encoder([im.float() / 255 for im in images]), encoder(images), atol=1e-6, rtol=0)


def test_packed_batch_input_and_unnormalized(trained_and_exported):
    model, path = trained_and_exported
    encoder = load_image_encoder(path)
    batch = encoder.pack_images(random_images(2))
    with torch.no_grad():
        expected = model.encode_image_slots(batch)[batch.valid.flatten()]
        torch.testing.assert_close(encoder(batch), expected, atol=1e-6, rtol=1e-5)
        raw = encoder(batch, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(raw)))


def test_forward_features_grids_follow_each_image_shape(trained_and_exported):
    encoder = load_image_encoder(trained_and_exported[1])
    images = random_images(3)
    with torch.no_grad():
        out = encoder.forward_features(images, layers=(0,))
    for image, grid, layer0 in zip(images, out["grids"], out["layer_0"]):
        rows, cols = fit_grid(image.shape[2], image.shape[1], 4, 40, 16)
        assert grid.shape == (rows, cols, 32) and layer0.shape == (rows, cols, 32)
        assert not torch.equal(grid, layer0)
    with torch.no_grad():  # a smaller token budget gives smaller grids
        small = encoder.forward_features(images[:1], max_tokens=8)["grids"][0]
    assert small.shape[0] * small.shape[1] <= 8


def test_bad_inputs_and_paths_are_named(trained_and_exported, tmp_path):
    encoder = load_image_encoder(trained_and_exported[1])
    with pytest.raises(ValueError, match="image 1"):
        encoder([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        encoder([torch.full((3, 8, 8), 2.0)])
    with pytest.raises(ValueError, match="at least one"):
        encoder([])
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_image_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 99}))
    (tmp_path / "model.safetensors").write_bytes((trained_and_exported[1] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="format_version"):
        load_image_encoder(tmp_path)


def test_fresh_process_gives_the_training_model_embeddings(trained_and_exported, tmp_path):
    """A new interpreter that imports only the export module reproduces the training model's
    embeddings (fp32, atol 1e-5), and never imports DeepSpeed or the training code."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    model, path = trained_and_exported
    images = random_images(4)
    save_file({f"img{i}": im.contiguous() for i, im in enumerate(images)}, str(tmp_path / "in.safetensors"))
    script = f"""
import sys, torch
from safetensors.torch import load_file, save_file
from navit_clip.export import load_image_encoder
inputs = load_file({str(tmp_path / 'in.safetensors')!r})
encoder = load_image_encoder({str(path)!r})
with torch.no_grad():
    emb = encoder([inputs[f"img{{i}}"] for i in range(len(inputs))])
save_file({{"emb": emb}}, {str(tmp_path / 'out.safetensors')!r})
leaked = [m for m in sys.modules if m.startswith(("deepspeed", "navit_clip.train"))]
assert not leaked, leaked
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))["emb"]
    for i, image in enumerate(images):
        torch.testing.assert_close(got[i], training_path_embedding(model, image), atol=1e-5, rtol=0)


def test_text_encoder_export_matches_training_model(trained_and_exported, tmp_path):
    from navit_clip.data.text import CaptionTokenizer
    from navit_clip.export import load_text_encoder

    model, path = trained_and_exported
    with pytest.raises(ValueError, match="--with-text"):
        load_text_encoder(path)
    both = export_image_encoder(model, tmp_path / "both", max_tokens_per_image=40, seq_len=64, max_images=4,
                                with_text=True)
    config = json.loads((both / "config.json").read_text())
    assert config["text"]["context_length"] == 8 and config["position_embedding"] == "FactorizedPosEmb"
    assert config["weights"] == {"image": "model.safetensors", "text": "text.safetensors"}
    text_state = load_text_encoder(both).state_dict()
    assert list(text_state) == list(model.text.state_dict())
    assert all(torch.equal(text_state[k], v) for k, v in model.text.state_dict().items())
    assert torch.equal(load_text_encoder(both).logit_scale, model.logit_scale.detach())
    assert config["normalization"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    tokens = torch.from_numpy(CaptionTokenizer(8)(["a red square", "two dogs", "x"]))
    with torch.no_grad():
        torch.testing.assert_close(load_text_encoder(both)(tokens), model.encode_text(tokens), atol=1e-6, rtol=0)
        torch.testing.assert_close(load_image_encoder(both)(random_images()), load_image_encoder(path)(random_images()))


def test_torch_export_program_equals_eager(trained_and_exported):
    """The packed forward exported at fixed S, L, E_max gives eager's embeddings on a batch it was
    not traced with (real images, real segments)."""
    from navit_clip.export_program import export_program

    encoder = load_image_encoder(trained_and_exported[1])
    program = export_program(encoder, num_sequences=2)
    small = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w))
             for h, w in ((16, 16), (8, 24), (20, 12), (12, 12), (4, 28))]
    batch = encoder.pack_images(small)
    assert batch.num_sequences <= 2
    pad = 2 - batch.num_sequences  # the program has a fixed S: add empty sequences
    patches = torch.cat([batch.patches, batch.patches.new_zeros(pad, *batch.patches.shape[1:])])
    coords = torch.cat([batch.coords, batch.coords.new_zeros(pad, *batch.coords.shape[1:])])
    segment = torch.cat([batch.segment, batch.segment.new_full((pad, batch.seq_len), -1)])
    with torch.no_grad():
        out = program.module()(patches, coords, segment)
        eager = encoder(batch)
    assert out.shape == (2, 4, 24)
    torch.testing.assert_close(out[: batch.num_sequences].flatten(0, 1)[batch.valid.flatten()], eager,
                               atol=1e-5, rtol=0)


def legacy_tensors(model: NaViTCLIP, with_text: bool) -> dict[str, torch.Tensor]:
    """The weights as formats 1 and 2 stored them: one file, keyed by the names the CLIP model
    gave its parts before each tower owned its projection."""
    tensors = {f"visual.{k}": v for k, v in model.image.navit.state_dict().items()}
    tensors["image_proj.weight"] = model.image.proj.weight
    if with_text:
        tensors.update({f"text.{k}": v for k, v in model.text.transformer.state_dict().items()})
        tensors["text_proj.weight"] = model.text.proj.weight
        tensors["logit_scale"] = model.logit_scale
    return {k: v.detach().float().contiguous() for k, v in tensors.items()}


def test_older_exports_still_load(trained_and_exported, tmp_path):
    """Format 1 (image_encoder.safetensors) with a config written before some VisionConfig fields
    existed (the missing fields take their defaults), and format 2 (model.safetensors with both
    towers): their keys are converted to the towers' own."""
    from safetensors.torch import save_file

    from navit_clip.data.text import CaptionTokenizer
    from navit_clip.export import load_text_encoder

    model, path = trained_and_exported
    config = json.loads((path / "config.json").read_text())
    vision = {k: v for k, v in config["vision"].items() if k != "attention"}
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "config.json").write_text(json.dumps({"format_version": 1, "vision": vision, "embed_dim": 24,
                                                "max_tokens_per_image": 40, "seq_len": 64, "max_images": 4}))
    save_file(legacy_tensors(model, with_text=False), str(v1 / "image_encoder.safetensors"))
    v2 = tmp_path / "v2"
    v2.mkdir()
    text = {"width": 32, "depth": 1, "heads": 2, "context_length": 8}
    (v2 / "config.json").write_text(json.dumps({**config, "format_version": 2, "text": text, "weights": None}))
    save_file(legacy_tensors(model, with_text=True), str(v2 / "model.safetensors"))
    tokens = torch.from_numpy(CaptionTokenizer(8)(["a red square", "two dogs"]))
    with torch.no_grad():
        expected = load_image_encoder(path)(random_images())
        for old in (v1, v2):
            torch.testing.assert_close(load_image_encoder(old)(random_images()), expected, atol=0, rtol=0)
        text_encoder = load_text_encoder(v2)
        torch.testing.assert_close(text_encoder(tokens), model.encode_text(tokens), atol=0, rtol=0)
    assert torch.equal(text_encoder.logit_scale, model.logit_scale.detach())


def test_wrong_model_paths_are_named(trained_and_exported, tmp_path):
    from navit_clip.eval.towers import load_towers

    with pytest.raises(FileNotFoundError, match="neither a training run"):
        load_towers(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_towers(tmp_path / "nowhere")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_towers(tmp_path / "run")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_towers(tmp_path / "bad")
    towers = load_towers(trained_and_exported[1])  # image tower only: zero-shot needs text
    with pytest.raises(ValueError, match="no text encoder"):
        towers.require_text()
