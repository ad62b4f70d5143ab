"""Caption tokenization with open_clip's bundled BPE vocabulary (works offline)."""

from __future__ import annotations

import numpy as np
from open_clip.tokenizer import SimpleTokenizer


class CaptionTokenizer:
    """Captions -> [n, context_length] int64 ids: start token, BPE, end token, zero padding."""

    def __init__(self, context_length: int) -> None:
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.vocab_size = self._bpe.vocab_size
        self.eot_token_id = self._bpe.eot_token_id

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self._bpe(texts, context_length=self.context_length).numpy().astype(np.int64)
