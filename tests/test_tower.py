"""The NaViT tower at every setting: an image's embedding is the same alone or packed (every
position embedding, pooling and attention backend), no gradient crosses images, padding never
changes an output, grids beyond the table run, presets have ViT's sizes, checkpointing and
compile change nothing, and exported encoders with any setting load back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_model import CTX, P, C, float_patches, images, locate, make_image, tiny_config

from navit_clip.config import ConfigError, VisionConfig, load_config, vision_preset
from navit_clip.data.packing import to_packed_batch
from navit_clip.export import export_image_encoder, load_image_encoder
from navit_clip.model.clip import NaViTCLIP
from navit_clip.model.navit import NaViT

POSEMBS = [("learned", "absolute", "sum"), ("learned", "fractional", "stack"), ("sinusoidal", "absolute", "sum"),
           ("sinusoidal", "fractional", "product"), ("fourier", "absolute", "stack"), ("fourier", "fractional", "sum"),
           ("learned_2d", "absolute", "sum"), ("learned_2d", "fractional", "sum"), ("learned", "absolute", "product")]
POSEMB_IDS = ["-".join(p) for p in POSEMBS]
FORWARD_BACKENDS = ["reference", "sdpa", "sdpa_per_image", "flex"]
TRAIN_BACKENDS = ["sdpa", "sdpa_per_image"]
# every position embedding with every backend under MAP pooling; mean pooling with the CPU default
FORWARD_CASES = [(p, a, "map") for p in POSEMBS for a in FORWARD_BACKENDS] + [(p, "sdpa_per_image", "mean") for p in POSEMBS]
TRAIN_CASES = [(p, a, "map") for p in POSEMBS for a in TRAIN_BACKENDS] + [(p, "sdpa_per_image", "mean") for p in POSEMBS]
TRAIN_CASES.append((POSEMBS[0], "reference", "map"))  # the plain backend the others are checked against


def case_id(case) -> str:
    return "-".join([*case[0], case[1], case[2]])


def make_model(posemb=("learned", "absolute", "sum"), attention="auto", pooling="map", **vision) -> NaViTCLIP:
    cfg = tiny_config(attention)
    cfg.vision = replace(cfg.vision, posemb=posemb[0], posemb_coords=posemb[1], posemb_combine=posemb[2],
                         pooling=pooling, **vision)
    torch.manual_seed(0)
    model = NaViTCLIP(cfg).eval()
    with torch.no_grad():  # off the init, so that every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def packed(*rows, seq_len=60, max_images=5):
    return to_packed_batch([list(r) for r in rows], seq_len=seq_len, max_images=max_images, patch_dim=P * P * C,
                           text_len=CTX)


@pytest.mark.parametrize("posemb,attention,pooling", FORWARD_CASES, ids=map(case_id, FORWARD_CASES))
def test_alone_equals_packed(posemb, attention, pooling):
    model = make_model(posemb, attention, pooling)
    imgs = images()
    with torch.no_grad():
        for key in ("x", "y"):
            alone = packed([imgs[key]], seq_len=24, max_images=1)
            emb_alone = model.encode_image_slots(alone)[0]
            batch = packed([imgs["a"], imgs["b"]], [imgs["c"], imgs[key], imgs["a"]], seq_len=56)
            s, slot = locate(batch, key)
            emb = model.encode_image_slots(batch)
            torch.testing.assert_close(emb[s * batch.max_images + slot], emb_alone, atol=2e-5, rtol=0)
            assert not torch.allclose(emb[0], emb_alone, atol=1e-3)  # other images give other embeddings


@pytest.mark.parametrize("posemb,attention,pooling", TRAIN_CASES, ids=map(case_id, TRAIN_CASES))
def test_gradient_across_images_is_exactly_zero(posemb, attention, pooling):
    model = make_model(posemb, attention, pooling)
    imgs = images()
    batch = float_patches(packed([imgs["a"], imgs["b"]], [imgs["c"], imgs["x"], imgs["y"]], seq_len=64))
    E = batch.max_images
    for s, slot in [(1, 1), (1, 2), (0, 0)]:
        batch.patches.grad = None
        emb = model.encode_image_slots(batch)[s * E + slot]
        (emb * torch.linspace(-1, 1, emb.numel())).sum().backward()
        grad = batch.patches.grad
        own = torch.zeros_like(batch.segment, dtype=torch.bool)
        own[s] = batch.segment[s] == slot
        assert torch.equal(grad[~own], torch.zeros_like(grad[~own])), "gradient leaked across images"
        # every own token influences the embedding
        assert (grad[own].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("attention", FORWARD_BACKENDS)
@pytest.mark.parametrize("posemb", POSEMBS, ids=POSEMB_IDS)
def test_padding_never_changes_any_output(posemb, attention):
    """Garbage in the padding tokens (pixels and coordinates) changes neither the pooled
    embeddings nor any image token's features."""
    model = make_model(posemb, attention)
    imgs = images()
    batch = packed([imgs["a"], imgs["y"]], [imgs["c"]], seq_len=48)
    pad = batch.segment < 0
    assert pad[0].any() and pad[1].any()
    gen = torch.Generator().manual_seed(3)
    noisy = replace(batch, patches=batch.patches.clone(), coords=batch.coords.clone())
    noisy.patches[pad] = torch.randint(0, 256, noisy.patches[pad].shape, generator=gen, dtype=torch.uint8)
    noisy.coords[pad] = torch.randint(0, 1000, noisy.coords[pad].shape, generator=gen)
    visual = model.image.navit

    def outputs(b):
        with torch.no_grad():
            return (visual(b.patches, b.coords, b.segment, b.max_images, grid=b.grid),
                    visual.forward_tokens(b.patches, b.coords, b.segment, grid=b.grid)[0])

    (pooled, tokens), (noisy_pooled, noisy_tokens) = outputs(batch), outputs(noisy)
    torch.testing.assert_close(noisy_pooled, pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(noisy_tokens[~pad], tokens[~pad], atol=1e-6, rtol=0)
    assert not torch.allclose(noisy_tokens[pad], tokens[pad])  # the garbage did reach the padding


@pytest.mark.parametrize("posemb", POSEMBS, ids=POSEMB_IDS)
def test_grid_beyond_max_grid_side_runs_and_stays_packing_invariant(posemb):
    """max_grid_side=16; a 2×21 and a 20×3 image run (documented extrapolation), finite, and
    still give the same embedding alone and packed."""
    model = make_model(posemb, "sdpa_per_image")
    wide, tall = make_image("w", 2, 21, seed=7), make_image("t", 20, 3, seed=8)
    with torch.no_grad():
        alone = model.encode_image_slots(packed([tall], seq_len=64, max_images=1))[0]
        batch = packed([wide, tall], seq_len=110, max_images=3)
        emb = model.encode_image_slots(batch)
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb[1], alone, atol=2e-5, rtol=0)


def test_gradient_checkpointing_changes_nothing():
    imgs = images()
    batch = packed([imgs["a"], imgs["b"]], [imgs["c"], imgs["x"]], seq_len=48)
    results = []
    for checkpointing in (False, True):
        model = make_model(grad_checkpointing=checkpointing).train()
        for block in model.text.transformer.blocks:
            block.checkpointing = checkpointing
        blocks = [*model.image.navit.blocks, *model.text.transformer.blocks]
        assert all(b.checkpointing == checkpointing for b in blocks)
        out = model(batch)
        loss = (out["image"] @ out["text"].T).diagonal()[out["valid"]].sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=0)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_text_checkpointing_flag_comes_from_config():
    cfg = load_config(None, ["model.text.grad_checkpointing=true", "model.vision.grad_checkpointing=true"])
    model = NaViTCLIP(cfg.model)
    assert all(b.checkpointing for b in [*model.image.navit.blocks, *model.text.transformer.blocks])


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "auto"])
def test_compiled_tower_equals_eager(attention):
    """Two batches of different layouts: the per-image backend stays outside the compiled graph,
    so a new layout neither breaks nor changes anything."""
    imgs = images()
    eager = make_model(attention=attention)
    compiled = make_model(attention=attention, compile=True)
    for batch in (packed([imgs["a"], imgs["b"]], [imgs["c"], imgs["x"]], seq_len=48),
                  packed([imgs["y"], imgs["c"], imgs["a"]], [imgs["b"]], seq_len=48)):
        with torch.no_grad():
            torch.testing.assert_close(compiled.encode_image_slots(batch), eager.encode_image_slots(batch),
                                       atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

TIMM_NAMES = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224", "B/16": "vit_base_patch16_224",
              "L/16": "vit_large_patch16_224", "So400m/14": "vit_so400m_patch14_siglip_224",
              "H/14": "vit_huge_patch14_224"}
VIT_TRUNK_MILLIONS = {"Ti/16": 5.5, "S/16": 21.7, "B/16": 85.8, "L/16": 303.3, "So400m/14": 412.3, "H/14": 630.8}


def trunk_parameters(model: NaViT) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("pool."))


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_preset_blocks_equal_timm_vit(name):
    """Counted on the meta device (nothing allocated): the blocks have exactly the parameters of
    timm's ViT of the same name, and the trunk is within 1% of ViT's (no class token or head)."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = NaViT(VisionConfig(**vision_preset(name), max_grid_side=64))
        theirs = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=0)
    assert sum(p.numel() for p in ours.blocks.parameters()) == sum(p.numel() for p in theirs.blocks.parameters())
    assert ours.cfg.patch_size == theirs.patch_embed.proj.weight.shape[-1]
    assert trunk_parameters(ours) / 1e6 == pytest.approx(VIT_TRUNK_MILLIONS[name], rel=0.01)


@pytest.mark.parametrize("name,millions", [("Ti/16", 5.7), ("S/16", 22.0)])
def test_small_presets_instantiate_and_run(name, millions):
    cfg = load_config(None, [f"model.vision.preset={name}", "model.vision.max_grid_side=16"])
    torch.manual_seed(0)
    model = NaViT(cfg.model.vision).eval()
    assert trunk_parameters(model) / 1e6 == pytest.approx(millions, rel=0.05)
    p = cfg.model.vision.patch_size
    tokens = torch.randint(0, 256, (1, 12, p * p * 3), dtype=torch.uint8)
    coords = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(1, 12, 2)
    with torch.no_grad():
        out = model(tokens, coords, torch.zeros(1, 12, dtype=torch.long), 2, grid=torch.tensor([[[3, 4], [0, 0]]]))
    assert out.shape == (1, 2, cfg.model.vision.width) and torch.isfinite(out).all()


def test_preset_fills_and_explicit_keys_win(tmp_path):
    cfg = load_config(None, ["model.vision.preset=B/16"])
    v = cfg.model.vision
    assert (v.width, v.depth, v.heads, v.patch_size) == (768, 12, 12, 16)
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  vision: {preset: So400m/14, depth: 2}\n")
    v = load_config(config, ["model.vision.width=1152"]).model.vision
    assert (v.width, v.depth, v.heads, v.patch_size, round(v.width * v.mlp_ratio)) == (1152, 2, 16, 14, 4304)
    with pytest.raises(ConfigError, match=r"model\.vision\.preset"):
        load_config(None, ["model.vision.preset=B/15"])
    with pytest.raises(ConfigError, match=r"model\.vision\.preset"):
        load_config(None, ["model.vision.preset=XXL/16"])


@pytest.mark.parametrize("key,value", [("posemb", "rotary"), ("posemb_coords", "relative"), ("posemb_combine", "max"),
                                       ("pooling", "cls"), ("attention", "xformers")])
def test_bad_vision_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"model\.vision\.{key}"):
        load_config(None, [f"model.vision.{key}={value}"])


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

def test_export_keeps_posemb_and_pooling_and_reads_old_configs(tmp_path):
    model = make_model(("fourier", "fractional", "stack"), pooling="mean")
    path = export_image_encoder(model, tmp_path / "enc", max_tokens_per_image=30, seq_len=64, max_images=4)
    saved = json.loads((path / "config.json").read_text())["vision"]
    assert (saved["posemb"], saved["posemb_coords"], saved["posemb_combine"], saved["pooling"]) == \
        ("fourier", "fractional", "stack", "mean")
    batch = packed([images()["a"], images()["y"]], seq_len=64, max_images=4)
    with torch.no_grad():
        want = model.encode_image_slots(batch)[batch.valid.flatten()]
        torch.testing.assert_close(load_image_encoder(path)(batch), want, atol=1e-6, rtol=1e-5)

    # an encoder exported before these fields existed loads with the defaults it was trained with
    old_model = make_model()
    old = export_image_encoder(old_model, tmp_path / "old", max_tokens_per_image=30, seq_len=64, max_images=4)
    config = json.loads((old / "config.json").read_text())
    for key in ("posemb", "posemb_coords", "posemb_combine", "pooling", "grad_checkpointing", "compile", "preset"):
        del config["vision"][key]
    (old / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        want = old_model.encode_image_slots(batch)[batch.valid.flatten()]
        torch.testing.assert_close(load_image_encoder(old)(batch), want, atol=1e-6, rtol=1e-5)
