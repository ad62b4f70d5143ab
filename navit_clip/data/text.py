"""Caption tokenization: open_clip's bundled English BPE (`clip-bpe`, works offline) or a
SentencePiece model file (`navit-clip train-tokenizer` trains one on the shards' captions).

Either way a caption becomes [start] + ids + [end], zero-padded to the context length; a caption
longer than the context is cut and its last id replaced by the end token, as open_clip does, and
counted. The vocabulary size and the end token id come from the tokenizer, never from the config
(`apply_tokenizer`). A run keeps a copy of its SentencePiece file (TOKENIZER_FILE), and so does an
export, so neither needs the original path.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from navit_clip.config_load import ConfigError, resolve_path

CLIP_BPE = "clip-bpe"
TOKENIZER_FILE = "tokenizer.model"  # the copy of a SentencePiece model kept in runs and exports
PAD_ID = 0
KNOWN_CAPTIONS = 50_000  # captions whose ids a tokenizer keeps (~10 MB at most)


class CaptionTokenizer:
    """Captions -> [n, context_length] int64 ids: start token, ids, end token, zero padding."""

    def __init__(self, context_length: int, tokenizer: str = CLIP_BPE) -> None:
        self.context_length = context_length
        self.name = tokenizer
        if tokenizer == CLIP_BPE:
            from open_clip.tokenizer import SimpleTokenizer

            bpe = SimpleTokenizer(context_length=context_length)
            self._encode: Callable[[str], list[int]] = bpe.encode
            self.vocab_size, self.start_id, self.end_id = bpe.vocab_size, bpe.sot_token_id, bpe.eot_token_id
        else:
            sp = load_sentencepiece(tokenizer)
            self._encode = functools.partial(sp.encode, out_type=int)
            self.vocab_size, self.end_id = sp.get_piece_size(), sp.eos_id()
            self.start_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eot_token_id = self.end_id
        self._known: dict[str, tuple[int, ...]] = {}

    def ids(self, text: str) -> list[int]:
        """One caption's framed ids before padding or truncation. A caption seen before is not
        encoded again (the BPE's text cleaning costs ~0.2 ms a caption): templated captions,
        repeated alt-texts and every epoch after the first of a small set."""
        body = self._known.get(text)
        if body is None:
            body = tuple(self._encode(text))
            if len(self._known) < KNOWN_CAPTIONS:
                self._known[text] = body
        head = [] if self.start_id is None else [self.start_id]
        return [*head, *body, self.end_id]

    def encode_counted(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """-> ([n, context_length] ids, how many captions were cut to fit the context)."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        truncated = 0
        for row, text in enumerate(texts):
            ids = self.ids(text)
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = self.end_id
                truncated += 1
            out[row, :len(ids)] = ids
        return out, truncated

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.encode_counted(texts)[0]


def load_sentencepiece(path: str | Path) -> Any:
    """A SentencePiece processor for `path`; its end token must exist and differ from padding."""
    import sentencepiece as spm

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config key model.text.tokenizer: {path} is neither {CLIP_BPE!r} nor an existing "
                          "SentencePiece model file (train one with `navit-clip train-tokenizer`)")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(file))
    except (RuntimeError, OSError) as exc:
        raise ConfigError(f"config key model.text.tokenizer: {path} is not a SentencePiece model: {exc}") from exc
    if sp.eos_id() <= PAD_ID:
        raise ConfigError(f"config key model.text.tokenizer: {path} has no end-of-sentence token other than id "
                          f"{PAD_ID} (eos_id={sp.eos_id()}); captions need one to mark their end")
    return sp


@functools.lru_cache(maxsize=8)
def _cached(tokenizer: str, context_length: int, modified: float) -> CaptionTokenizer:
    return CaptionTokenizer(context_length, tokenizer)


def cached_tokenizer(tokenizer: str, context_length: int) -> CaptionTokenizer:
    """Building the BPE tables takes ~0.2 s: once per process, not once per stream or epoch (a
    SentencePiece file rewritten since is read again)."""
    modified = os.path.getmtime(tokenizer) if tokenizer != CLIP_BPE and os.path.exists(tokenizer) else 0.0
    return _cached(tokenizer, context_length, modified)


def apply_tokenizer(text: Any, explicit: dict[str, Any]) -> None:
    """Set model.text's vocab_size and end_token_id from its tokenizer (a relative SentencePiece
    path is resolved first). A value the config set explicitly (`explicit`: the model.text keys
    of the YAML file and the overrides) that disagrees is a ConfigError naming both values."""
    if text.tokenizer != CLIP_BPE:
        text.tokenizer = str(resolve_path(text.tokenizer).absolute())
    tokenizer = CaptionTokenizer(text.context_length, text.tokenizer)
    last_id = tokenizer.vocab_size - 1
    for key, value in (("vocab_size", tokenizer.vocab_size), ("end_token_id", tokenizer.end_id)):
        said = explicit.get(key, value)
        if key == "end_token_id" and said == -1:
            said = last_id
        if said != value:
            raise ConfigError(f"config key model.text.{key}={explicit[key]} disagrees with the tokenizer "
                              f"{text.tokenizer}, whose {key} is {value}; leave model.text.{key} unset "
                              "(it comes from the tokenizer)")
    text.vocab_size = tokenizer.vocab_size
    text.end_token_id = -1 if tokenizer.end_id == last_id else tokenizer.end_id  # -1: CLIP's convention
