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
