"""The text side: end-token pooling without an id-order assumption, the SigLIP-style tower, the
SentencePiece tokenizer and its config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from navit_clip.config import TextConfig
from navit_clip.data.text import CLIP_BPE, CaptionTokenizer
from navit_clip.model.text import TextTransformer

CTX = 16


def tower(vocab: int = 49408, **kwargs) -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(TextConfig(vocab_size=vocab, width=32, depth=2, heads=2, context_length=CTX,
                                      **kwargs)).eval()


def argmax_pooled(model: TextTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's pooling, recomputed outside the model: the feature at tokens.argmax()."""
    x = model.token_emb(tokens) + model.pos_emb[:tokens.shape[-1]]
    for block in model.blocks:
        x = block(x, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    x = model.norm(x)
    return x[torch.arange(len(tokens)), tokens.argmax(dim=-1)]


def test_clip_bpe_pooling_is_bit_identical_to_argmax():
    tokenizer = CaptionTokenizer(CTX, CLIP_BPE)
    captions = ["a photo of the digit 7", "x", "a very long caption " * 10, "!!! 0 0 0", "Emoji 🙂 and 日本語"]
    tokens = torch.from_numpy(tokenizer(captions))
    model = tower()
    with torch.no_grad():
        assert torch.equal(model(tokens), argmax_pooled(model, tokens))


def test_end_token_found_whatever_its_id():
    """The end token (id 5 here) is smaller than other ids of the caption: pooling still uses it."""
    model = tower(vocab=100, end_token_id=5)
    tokens = torch.tensor([[2, 90, 91, 5, 0, 0], [2, 90, 5, 0, 0, 0]])
    with torch.no_grad():
        out = model(tokens)
        torch.testing.assert_close(out[0], model(tokens[:1, :4])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], model(tokens[1:, :3])[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[0], argmax_pooled(model, tokens)[0], atol=1e-3)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_non_causal_tower_ignores_padding_and_sees_later_tokens(pooling):
    model = tower(vocab=100, end_token_id=3, causal=False, pooling=pooling)
    tokens = torch.tensor([[2, 40, 41, 42, 3, 0, 0, 0]])
    with torch.no_grad():
        out = model(tokens)
        # padding (and anything after the end) is invisible: same as the caption alone
        torch.testing.assert_close(out, model(tokens[:, :5]), atol=1e-5, rtol=1e-5)
        after = tokens.clone()
        after[0, 5:] = torch.tensor([50, 51, 52])
        torch.testing.assert_close(model(after), out, atol=1e-5, rtol=1e-5)
        # non-causal: the first token's feature depends on later tokens
        later = tokens.clone()
        later[0, 3] = 60
        assert (model(later) - out).abs().max() > 1e-4


def test_non_causal_mean_pooling_matches_reference():
    model = tower(vocab=100, end_token_id=3, causal=False, pooling="mean")
    tokens = torch.tensor([[2, 40, 41, 3, 0, 0], [2, 7, 3, 0, 0, 0]])
    with torch.no_grad():
        out = model(tokens)
        for i, n in enumerate([4, 3]):
            x = model.token_emb(tokens[i:i + 1, :n]) + model.pos_emb[:n]
            for block in model.blocks:
                x = block(x, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            torch.testing.assert_close(out[i], model.norm(x)[0].mean(dim=0), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------

MULTILINGUAL = ["a red square on a white field", "빨간 사각형이 있는 사진", "白色背景上的红色方块",
                "مربع أحمر على خلفية بيضاء", "a cat 🐱 and a dog 🐶 🙂", "Ünïcödé déjà vu, naïve café",
                "日本語のキャプションと English mixed", "صورة 🌍 世界 world 세계"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    """A SentencePiece model trained by `train_tokenizer` on shards of multilingual captions,
    one of them not UTF-8 and one without an image."""
    from navit_clip.data.shard_files import write_shards
    from navit_clip.data.tokenizer_training import train_tokenizer

    root = tmp_path_factory.mktemp("sp")
    png = _png()
    samples = [{"__key__": f"s{i:04d}", "png": png, "txt": f"{MULTILINGUAL[i % len(MULTILINGUAL)]} number {i}"}
               for i in range(200)]
    samples += [{"__key__": "badutf8", "png": png, "txt": b"\xff\xfe caption"}, {"__key__": "noimage", "txt": "hi"}]
    write_shards(samples, str(root / "shards-%06d.tar"), 50)
    info = train_tokenizer(str(root / "shards-{000000..000004}.tar"), 400, root / "tok", progress=False)
    assert info["captions"] == 200
    assert info["skipped"] == {"caption_not_utf8": 1, "no_image": 1}
    return info["tokenizer"]


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sentencepiece_ids_are_sentencepiece_encode_framed(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tokenizer = CaptionTokenizer(48, sp_model)
    assert (tokenizer.vocab_size, tokenizer.start_id, tokenizer.end_id) == (sp.get_piece_size(), 2, 3)
    out = tokenizer(MULTILINGUAL)
    for row, caption in zip(out, MULTILINGUAL):
        expected = [sp.bos_id()] + sp.encode(caption) + [sp.eos_id()]
        assert len(expected) <= 48
        assert row.tolist() == expected + [0] * (48 - len(expected))
        assert sp.unk_id() not in row.tolist()  # byte fallback: every script encodes
        assert sp.decode(row[1:len(expected) - 1].tolist()) == caption


@pytest.mark.parametrize("which", ["clip", "sp"])
def test_long_captions_are_cut_keeping_the_end_token_and_counted(which, sp_model):
    tokenizer = CaptionTokenizer(8, CLIP_BPE if which == "clip" else sp_model)
    long = "a very long caption that goes on and on " * 4
    ids, truncated = tokenizer.encode_counted([long, "hi", long])
    assert truncated == 2
    full = tokenizer.ids(long)
    assert ids[0].tolist() == full[:7] + [tokenizer.end_id]
    assert ids[1].tolist()[:len(tokenizer.ids("hi"))] == tokenizer.ids("hi")
    if which == "clip":  # open_clip's own tokenizer agrees, id for id
        from open_clip.tokenizer import SimpleTokenizer

        assert np.array_equal(ids, SimpleTokenizer()([long, "hi", long], context_length=8).numpy())


def test_vocab_size_comes_from_the_tokenizer(sp_model):
    from navit_clip.config import ConfigError, load_config

    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_file=sp_model).get_piece_size()
    cfg = load_config(None, [f"model.text.tokenizer={sp_model}"])
    assert (cfg.model.text.vocab_size, cfg.model.text.end_token_id) == (size, 3)
    assert load_config(None, [f"model.text.tokenizer={sp_model}", f"model.text.vocab_size={size}"])
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"model.text.tokenizer={sp_model}", "model.text.vocab_size=49408"])
    assert "model.text.vocab_size=49408" in str(info.value) and f"is {size}" in str(info.value)
    with pytest.raises(ConfigError, match="vocab_size=1000 .* is 49408"):
        load_config(None, ["model.text.vocab_size=1000"])
    with pytest.raises(ConfigError, match="model.text.tokenizer"):
        load_config(None, ["model.text.tokenizer=/nonexistent/tokenizer.model"])


def test_export_carries_the_tokenizer(sp_model, tmp_path):
    """The exported text encoder tokenizes and encodes with its own copy of the SentencePiece
    file after the original is gone."""
    import shutil

    from navit_clip.config import ModelConfig, VisionConfig, load_config
    from navit_clip.export import export_image_encoder, load_text_encoder
    from navit_clip.model.clip import NaViTCLIP

    own = tmp_path / "own.model"
    shutil.copyfile(sp_model, own)
    text = load_config(None, [f"model.text.tokenizer={own}", "model.text.width=32", "model.text.depth=1",
                              "model.text.heads=2", "model.text.causal=false"]).model.text
    torch.manual_seed(0)
    model = NaViTCLIP(ModelConfig(vision=VisionConfig(width=32, depth=1, heads=2), text=text, embed_dim=16)).eval()
    export = export_image_encoder(model, tmp_path / "export", max_tokens_per_image=16, seq_len=32, max_images=2,
                                  with_text=True)
    tokens = torch.from_numpy(CaptionTokenizer(text.context_length, str(own))(MULTILINGUAL))
    with torch.no_grad():
        expected = model.encode_text(tokens)
    own.unlink()
    moved = shutil.move(str(export), tmp_path / "elsewhere")
    encoder = load_text_encoder(moved)
    assert encoder.cfg.tokenizer == str((tmp_path / "elsewhere" / "tokenizer.model").absolute())
    with torch.no_grad():
        assert torch.equal(encoder.tokenize(MULTILINGUAL), tokens)
        torch.testing.assert_close(encoder(encoder.tokenize(MULTILINGUAL)), expected, atol=1e-5, rtol=1e-5)


def untrimmed(model: TextTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The tower run over every column of `tokens` (padding included), pooled as the model pools."""
    from navit_clip.model.text import _masked_attend, causal_attend, end_positions

    end = end_positions(tokens, model.end_token_id)
    inside = torch.arange(tokens.shape[-1]) <= end[:, None]
    attend = causal_attend if model.cfg.causal else _masked_attend(inside)
    x = model.token_emb(tokens) + model.pos_emb[:tokens.shape[-1]]
    for block in model.blocks:
        x = block(x, attend)
    x = model.norm(x)
    if model.cfg.pooling == "mean":
        return (x * inside[..., None]).sum(1) / inside.sum(1, keepdim=True)
    return x[torch.arange(len(tokens)), end]


@pytest.mark.parametrize("causal, pooling", [(True, "last"), (False, "last"), (False, "mean")])
def test_columns_after_the_longest_caption_are_not_computed(causal, pooling):
    """Short captions padded to the context length run at their batch's longest length, with the
    outputs of the tower run over the whole padded width."""
    model = tower(vocab=100, end_token_id=3, causal=causal, pooling=pooling)
    tokens = torch.tensor([[2, 40, 41, 3, 0, 0, 0, 0, 0, 0], [2, 50, 51, 52, 53, 3, 0, 0, 0, 0],
                           [2, 60, 3, 0, 0, 0, 0, 0, 0, 0]])
    widths = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    with torch.no_grad():
        out = model(tokens)
    hook.remove()
    assert widths == [6]  # the longest caption: 5 tokens and its end token
    with torch.no_grad():
        torch.testing.assert_close(out, untrimmed(model, tokens), atol=1e-5, rtol=1e-5)


def test_a_caption_seen_before_gets_the_same_ids_without_encoding_again(monkeypatch):
    import navit_clip.data.text as text

    monkeypatch.setattr(text, "KNOWN_CAPTIONS", 2)
    tokenizer = CaptionTokenizer(CTX)
    fresh = CaptionTokenizer(CTX)
    encoded: list[str] = []
    inner = tokenizer._encode
    tokenizer._encode = lambda caption: encoded.append(caption) or inner(caption)
    captions = ["a red cup", "two digits", "a red cup", "a third one", "a third one", "two digits"]
    for caption in captions:
        ids = tokenizer.ids(caption)
        assert ids == fresh.ids(caption)
        ids.append(-1)  # a caller's list is its own: the kept ids are not changed
    assert encoded == ["a red cup", "two digits", "a third one", "a third one"]  # only two are kept
    np.testing.assert_array_equal(tokenizer(captions), fresh(captions))
