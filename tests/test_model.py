"""Model side: position embedding, masked pooling, the NaViT tower (packing invariance, no
information across images), the text tower and the NaViTCLIP head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from navit_clip.batch import PackedBatch
from navit_clip.config import ModelConfig, TextConfig, VisionConfig
from navit_clip.data.packing import PatchedImage, pack, to_packed_batch
from navit_clip.model.attention import get_attend
from navit_clip.model.clip import NaViTCLIP
from navit_clip.model.navit import unpack_grids
from navit_clip.model.pooling import MaskedAttentionPool
from navit_clip.model.posemb import FactorizedPosEmb
from navit_clip.model.text import TextTransformer

P = 4
C = 3
VOCAB = 1000
EOT = VOCAB - 1
CTX = 16


def tiny_config(attention: str = "auto", loss: str = "softmax") -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(width=32, depth=2, heads=2, patch_size=P, max_grid_side=16, attention=attention),
        text=TextConfig(vocab_size=VOCAB, width=32, depth=2, heads=2, context_length=CTX),
        embed_dim=16, loss=loss,
    )


def make_caption(rng: np.random.Generator, length: int | None = None) -> np.ndarray:
    length = int(rng.integers(3, CTX)) if length is None else length
    text = np.zeros(CTX, dtype=np.int64)
    text[: length - 1] = rng.integers(1, EOT, length - 1)
    text[length - 1] = EOT
    return text


def make_image(key: str, rows: int, cols: int, seed: int, keep: float = 1.0) -> PatchedImage:
    """Random uint8 patches of a rows×cols grid; with keep < 1 a random subset is kept (dropping)."""
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    if keep < 1.0:
        n = max(1, int(round(keep * len(coords))))
        coords = coords[np.sort(rng.choice(len(coords), n, replace=False))]
    patches = rng.integers(0, 256, (len(coords), P * P * C), dtype=np.uint8)
    return PatchedImage(key=key, patches=patches, coords=coords.astype(np.int64), grid=(rows, cols),
                        text=make_caption(rng))


def images():
    return {
        "a": make_image("a", 3, 5, seed=1),
        "b": make_image("b", 4, 4, seed=2),
        "c": make_image("c", 2, 6, seed=3),
        "x": make_image("x", 3, 4, seed=4),
        "y": make_image("y", 5, 3, seed=5, keep=0.6),  # with dropped patches
    }


def locate(batch: PackedBatch, key: str) -> tuple[int, int]:
    for s, keys in enumerate(batch.keys):
        if key in keys:
            return s, keys.index(key)
    raise KeyError(key)


def float_patches(batch: PackedBatch) -> PackedBatch:
    from dataclasses import replace
    return replace(batch, patches=batch.patches.float().requires_grad_())


@pytest.fixture(scope="module")
def model() -> NaViTCLIP:
    torch.manual_seed(0)
    return NaViTCLIP(tiny_config()).eval()


# ---------------------------------------------------------------------------------------------
# FactorizedPosEmb
# ---------------------------------------------------------------------------------------------

def test_posemb_is_sum_of_row_and_col_tables():
    torch.manual_seed(0)
    pe = FactorizedPosEmb(dim=6, max_side=5)
    coords = torch.tensor([[[0, 0], [4, 1], [2, 3]], [[1, 4], [3, 3], [0, 2]]])
    out = pe(coords)
    assert out.shape == (2, 3, 6)
    for s in range(2):
        for i in range(3):
            r, c = coords[s, i].tolist()
            torch.testing.assert_close(out[s, i], pe.rows[r] + pe.cols[c], atol=0, rtol=0)


def test_posemb_transposed_grids_share_tables():
    torch.manual_seed(0)
    pe = FactorizedPosEmb(dim=4, max_side=8)
    rc = torch.tensor([[1, 6]])
    cr = torch.tensor([[6, 1]])
    # (1,6) and (6,1) use the same four table rows, crossed
    torch.testing.assert_close(pe(rc) - pe(cr), (pe.rows[1] - pe.rows[6] + pe.cols[6] - pe.cols[1])[None])


@pytest.mark.parametrize("bad", [[5, 0], [0, 5], [9, 9]])
def test_posemb_out_of_range_raises(bad):
    pe = FactorizedPosEmb(dim=4, max_side=5)
    with pytest.raises(ValueError, match=r"model\.vision\.max_grid_side"):
        pe(torch.tensor([[0, 0], bad]))


def test_posemb_gradient_reaches_used_rows_only():
    pe = FactorizedPosEmb(dim=4, max_side=6)
    pe(torch.tensor([[1, 2], [1, 3]])).sum().backward()
    assert torch.equal(pe.rows.grad[1], torch.full((4,), 2.0))
    assert torch.equal(pe.rows.grad[[0, 2, 3, 4, 5]], torch.zeros(5, 4))
    assert torch.equal(pe.cols.grad[[2, 3]], torch.ones(2, 4))
    assert torch.equal(pe.cols.grad[[0, 1, 4, 5]], torch.zeros(4, 4))


# ---------------------------------------------------------------------------------------------
# MaskedAttentionPool
# ---------------------------------------------------------------------------------------------

def pool_reference(pool: MaskedAttentionPool, tokens: torch.Tensor) -> torch.Tensor:
    """Hand-written attention pooling of one image's tokens [n, D] -> [D]."""
    H = pool.heads
    kv = pool.kv(pool.norm(tokens))
    D = tokens.shape[-1]
    k, v = kv[:, :D].reshape(-1, H, D // H), kv[:, D:].reshape(-1, H, D // H)
    heads = []
    for h in range(H):
        w = (k[:, h] @ pool.query[h] / math.sqrt(D // H)).softmax(0)
        heads.append(w @ v[:, h])
    return pool.out(torch.cat(heads))


@pytest.fixture
def pool_case():
    torch.manual_seed(0)
    pool = MaskedAttentionPool(dim=8, heads=2)
    x = torch.randn(2, 10, 8)
    segment = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1, -1],
                            [1, 1, 1, 1, 0, 0, -1, -1, -1, -1]])  # seq 1: slots 2, 3 empty
    return pool, x, segment


def test_pool_matches_hand_written_reference(pool_case):
    pool, x, segment = pool_case
    out = pool(x, segment, 4)
    assert out.shape == (2, 4, 8)
    for s in range(2):
        for slot in segment[s].unique().tolist():
            if slot < 0:
                continue
            torch.testing.assert_close(out[s, slot], pool_reference(pool, x[s][segment[s] == slot]),
                                       atol=1e-6, rtol=1e-5)


def test_pool_slot_depends_only_on_own_tokens(pool_case):
    pool, x, segment = pool_case
    base = pool(x, segment, 4)
    for s in range(2):
        for slot in segment[s].unique().tolist():
            if slot < 0:
                continue
            x2 = x.clone()
            x2[s, segment[s] != slot] = torch.randn_like(x2[s, segment[s] != slot]) * 10
            out = pool(x2, segment, 4)
            torch.testing.assert_close(out[s, slot], base[s, slot], atol=1e-6, rtol=0)


def test_pool_gradient_does_not_cross_slots(pool_case):
    pool, x, segment = pool_case
    x = x.clone().requires_grad_()
    pool(x, segment, 4)[0, 1].sum().backward()
    own = segment[0] == 1
    assert torch.equal(x.grad[0, ~own], torch.zeros_like(x.grad[0, ~own]))
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    assert x.grad[0, own].abs().sum() > 0


def test_pool_is_finite_with_empty_slots_and_backward(pool_case):
    pool, x, segment = pool_case
    x = x.clone().requires_grad_()
    out = pool(x, segment, 6)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


def test_pool_empty_slots_are_exactly_zero(pool_case):
    pool, x, segment = pool_case
    out = pool(x, segment, 6)
    assert torch.equal(out[0, 3:], torch.zeros(3, 8))
    assert torch.equal(out[1, 2:], torch.zeros(4, 8))


# ---------------------------------------------------------------------------------------------
# NaViT: packing invariance and no information across images
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["reference", "sdpa", "auto"])
def test_image_embedding_independent_of_packing(attention):
    torch.manual_seed(0)
    model = NaViTCLIP(tiny_config(attention)).eval()
    imgs = images()
    with torch.no_grad():
        for key in ("x", "y"):
            alone = to_packed_batch([[imgs[key]]], seq_len=40, max_images=3, patch_dim=P * P * C, text_len=CTX)
            emb_alone = model.encode_image_slots(alone)[0]
            pooled_alone = model.image.navit(alone.patches, alone.coords, alone.segment, alone.max_images)[0, 0]
            others = [imgs[k] for k in "abc"]
            # a different sequence, a later position and slot, a longer sequence, more slots
            packed = to_packed_batch([[others[0], others[1]], [others[2], imgs[key], others[0]]],
                                     seq_len=56, max_images=5, patch_dim=P * P * C, text_len=CTX)
            s, slot = locate(packed, key)
            assert (s, slot) == (1, 1)
            all_packed = model.encode_image_slots(packed)
            emb_packed = all_packed[s * packed.max_images + slot]
            pooled_packed = model.image.navit(packed.patches, packed.coords, packed.segment, packed.max_images)[s, slot]
            torch.testing.assert_close(emb_packed, emb_alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(pooled_packed, pooled_alone, atol=1e-5, rtol=0)
            # through the first-fit packer as well
            fitted = pack(list(imgs.values()), seq_len=40, max_images=3)
            fitted.validate()
            s, slot = locate(fitted, key)
            torch.testing.assert_close(model.encode_image_slots(fitted)[s * fitted.max_images + slot], emb_alone,
                                       atol=1e-5, rtol=0)
            # and the embeddings of different images really differ
            assert not torch.allclose(emb_packed, all_packed[1 * packed.max_images + 0], atol=1e-3)


def test_float_patches_equal_uint8_patches(model):
    imgs = images()
    batch = pack(list(imgs.values()), seq_len=40, max_images=3)
    with torch.no_grad():
        a = model.encode_image_slots(batch)
        b = model.encode_image_slots(float_patches(batch))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_unpack_grids_matches_forward_tokens(model):
    imgs = images()
    order = [[imgs["a"], imgs["y"]], [imgs["c"], imgs["x"]]]
    batch = to_packed_batch(order, seq_len=48, max_images=3, patch_dim=P * P * C, text_len=CTX)
    with torch.no_grad():
        tokens, kept = model.image.navit.forward_tokens(batch.patches, batch.coords, batch.segment)
    assert kept == {}
    assert tokens.shape == (2, 48, 32)
    grids = unpack_grids(tokens, batch.coords, batch.segment, batch.grid, batch.valid)
    assert len(grids) == 4
    flat = [img for seq in order for img in seq]
    positions = [0, len(imgs["a"].patches), 0, len(imgs["c"].patches)]
    seqs = [0, 0, 1, 1]
    for grid, img, start, s in zip(grids, flat, positions, seqs):
        rows, cols = img.grid
        assert grid.shape == (rows, cols, 32)
        filled = torch.zeros(rows, cols, dtype=torch.bool)
        for i, (r, c) in enumerate(img.coords.tolist()):
            assert torch.equal(grid[r, c], tokens[s, start + i])
            filled[r, c] = True
        assert torch.equal(grid[~filled], torch.zeros_like(grid[~filled]))  # dropped patches stay zero
    # the dropped-patch image really has holes
    assert len(imgs["y"].patches) < imgs["y"].grid[0] * imgs["y"].grid[1]

    # grids are packing-invariant as well
    alone = to_packed_batch([[imgs["x"]]], seq_len=20, max_images=1, patch_dim=P * P * C, text_len=CTX)
    with torch.no_grad():
        tok_alone, _ = model.image.navit.forward_tokens(alone.patches, alone.coords, alone.segment)
    grid_alone = unpack_grids(tok_alone, alone.coords, alone.segment, alone.grid, alone.valid)[0]
    torch.testing.assert_close(grids[3], grid_alone, atol=1e-5, rtol=0)


def test_forward_tokens_returns_intermediate_layers(model):
    visual = model.image.navit
    batch = pack(list(images().values()), seq_len=40, max_images=3)
    with torch.no_grad():
        final, kept = visual.forward_tokens(batch.patches, batch.coords, batch.segment, layers=(0,))
        assert len(kept) == 1
        # independent recomputation of block 0's output
        x = visual.patch_embed(visual.normalize(batch.patches)) + visual.pos_emb(batch.coords)
        attend = get_attend("reference")
        x0 = visual.blocks[0](x, lambda q, k, v: attend(q, k, v, batch.segment))
        torch.testing.assert_close(kept[0], x0, atol=1e-5, rtol=1e-5)
        x1 = visual.blocks[1](x0, lambda q, k, v: attend(q, k, v, batch.segment))
        torch.testing.assert_close(final, visual.norm(x1), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(kept[0], final, atol=1e-2)

        final2, kept2 = visual.forward_tokens(batch.patches, batch.coords, batch.segment, layers=(0, 1))
        assert len(kept2) == 2
        torch.testing.assert_close(kept2[0], kept[0], atol=0, rtol=0)
        torch.testing.assert_close(visual.norm(kept2[1]), final2, atol=1e-6, rtol=1e-6)
        # outputs are keyed by block index whatever order the layers were asked in
        _, kept3 = visual.forward_tokens(batch.patches, batch.coords, batch.segment, layers=(1, 0))
        torch.testing.assert_close(kept3[0], kept[0], atol=0, rtol=0)
        with pytest.raises(ValueError, match="blocks 0..1"):
            visual.forward_tokens(batch.patches, batch.coords, batch.segment, layers=(2,))


def test_navit_forward_shape_and_grid_side_limit(model):
    imgs = images()
    batch = pack(list(imgs.values()), seq_len=40, max_images=3)
    with torch.no_grad():
        pooled = model.image.navit(batch.patches, batch.coords, batch.segment, batch.max_images)
    assert pooled.shape == (batch.num_sequences, 3, 32)
    too_wide = make_image("w", 1, 17, seed=9)  # max_grid_side=16
    big = to_packed_batch([[too_wide]], seq_len=20, max_images=1, patch_dim=P * P * C, text_len=CTX)
    with pytest.raises(ValueError, match=r"model\.vision\.max_grid_side"):
        model.image.navit(big.patches, big.coords, big.segment, 1)


# ---------------------------------------------------------------------------------------------
# TextTransformer
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_model() -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(TextConfig(vocab_size=VOCAB, width=32, depth=2, heads=2, context_length=CTX)).eval()


def text_batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths = [3, 7, 16, 10]
    tokens = torch.from_numpy(np.stack([make_caption(rng, n) for n in lengths]))
    return tokens, lengths


def test_text_output_is_feature_at_eot(text_model):
    tokens, lengths = text_batch()
    with torch.no_grad():
        out = text_model(tokens)
        assert out.shape == (4, 32)
        for i, n in enumerate(lengths):
            # a causal model's feature at the EOT equals that of the caption truncated at the EOT
            truncated = text_model(tokens[i:i + 1, :n])
            torch.testing.assert_close(out[i], truncated[0], atol=1e-5, rtol=1e-5)
    # rows are not all the same
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_text_ignores_tokens_after_eot(text_model):
    tokens, lengths = text_batch(1)
    changed = tokens.clone()
    for i, n in enumerate(lengths):
        changed[i, n:] = torch.randint(1, EOT, (CTX - n,))
    with torch.no_grad():
        torch.testing.assert_close(text_model(changed), text_model(tokens), atol=1e-6, rtol=0)
        # but a token before the EOT matters
        before = tokens.clone()
        before[:, 0] = (before[:, 0] % (EOT - 2)) + 1
        assert (text_model(before) - text_model(tokens)).abs().amax(-1).min() > 1e-4


def test_text_eot_position_is_argmax(text_model):
    """EOT at a later position than other large ids: argmax still finds it."""
    tokens = torch.tensor([[5, EOT - 1, 7, EOT, 0, 0], [5, EOT - 1, 7, 9, EOT, 3]])
    with torch.no_grad():
        out = text_model(tokens)
        torch.testing.assert_close(out[0], text_model(tokens[:1, :4])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], text_model(tokens[1:, :5])[0], atol=1e-5, rtol=1e-5)


def test_text_too_long_raises(text_model):
    with pytest.raises(ValueError, match=r"model\.text\.context_length"):
        text_model(torch.ones(2, CTX + 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# NaViTCLIP
# ---------------------------------------------------------------------------------------------

def clip_batch():
    imgs = images()
    # 2 sequences × 4 slots, 3 + 2 images: slots (0,3), (1,2), (1,3) are empty
    return to_packed_batch([[imgs["a"], imgs["b"], imgs["x"]], [imgs["c"], imgs["y"]]],
                           seq_len=48, max_images=4, patch_dim=P * P * C, text_len=CTX)


def test_clip_forward_shapes_and_norms(model):
    batch = clip_batch()
    with torch.no_grad():
        out = model(batch)
    n = 2 * 4
    assert out["image"].shape == (n, 16)
    assert out["text"].shape == (n, 16)
    assert torch.equal(out["valid"], torch.tensor([1, 1, 1, 0, 1, 1, 0, 0], dtype=torch.bool))
    assert out["logit_scale"].shape == ()
    assert "logit_bias" not in out
    v = out["valid"]
    torch.testing.assert_close(out["image"][v].norm(dim=-1), torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["text"][v].norm(dim=-1), torch.ones(5), atol=1e-5, rtol=0)
    assert torch.equal(out["text"][~v], torch.zeros(3, 16))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(10.0), atol=1e-5, rtol=1e-6)


def test_clip_text_rows_align_with_slots(model):
    batch = clip_batch()
    with torch.no_grad():
        out = model(batch)
        flat = batch.text.flatten(0, 1)
        for i in out["valid"].nonzero().squeeze(1).tolist():
            ref = F.normalize(model.text.proj(model.text.transformer(flat[i:i + 1])), dim=-1)[0]
            torch.testing.assert_close(out["text"][i], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["image"], model.encode_image_slots(batch), atol=0, rtol=0)


def test_clip_invalid_image_slots_are_zero(model):
    batch = clip_batch()
    with torch.no_grad():
        out = model(batch)
    assert torch.equal(out["image"][~out["valid"]], torch.zeros(3, 16))


def test_clip_logit_scale_clamped():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = NaViTCLIP(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert torch.allclose(model.scale(), torch.tensor(math.exp(cfg.max_logit_scale)))
    assert torch.allclose(model(clip_batch())["logit_scale"], torch.tensor(100.0))
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    assert torch.allclose(model(clip_batch())["logit_scale"], torch.tensor(math.exp(1.5)))


def test_clip_sigmoid_has_bias_and_trains():
    from navit_clip.loss import contrastive_loss
    torch.manual_seed(0)
    model = NaViTCLIP(tiny_config(loss="sigmoid"))
    out = model(clip_batch())
    assert out["logit_bias"].shape == ()
    torch.testing.assert_close(out["logit_bias"], torch.tensor(-10.0))
    loss = contrastive_loss(out["image"], out["text"], out["valid"], out["logit_scale"], out["logit_bias"],
                            kind="sigmoid")
    loss.backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs() > 0
    assert torch.isfinite(model.image.navit.patch_embed[1].weight.grad).all()
    assert model.text.transformer.token_emb.weight.grad.abs().sum() > 0

    softmax_model = NaViTCLIP(tiny_config(loss="softmax"))
    assert softmax_model.logit_bias is None
