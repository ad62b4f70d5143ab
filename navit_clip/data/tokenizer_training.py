"""`navit-clip train-tokenizer`: a SentencePiece model fitted to the captions of the shards.

Captions are streamed from the shards with the training reader (bad shards, samples without an
image and captions that are missing, not UTF-8 or empty are skipped and counted by reason, as in
training; images are not decoded), up to a sample cap, straight into SentencePiece's trainer. The
model reserves id 0 for padding and has start and end tokens, as the caption tokenizer needs, and
falls back to bytes for characters it has not seen, so captions of any script encode.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from navit_clip.config import TOKENIZER_MODELS, TokenizerModel
from navit_clip.data.shard_files import read_raw
from navit_clip.data.shards import IMAGE_EXTENSIONS, BadSample, ReadStats, decode_caption, expand_shards
from navit_clip.data.text import TOKENIZER_FILE
from navit_clip.errors import InputError

log = logging.getLogger(__name__)

SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}  # padding must be id 0 (data/text.py)
INFO_FILE = "tokenizer.json"


def shard_captions(shards: str, stats: ReadStats, allow_pipe: bool = False) -> Iterator[str]:
    """Every usable caption of the shards, in shard order, on one line each."""
    for raw in read_raw(expand_shards(shards, allow_pipe), stats):
        try:
            if not any(ext in raw for ext in IMAGE_EXTENSIONS):
                raise BadSample("no_image")
            caption = decode_caption(raw)
        except BadSample as exc:
            stats.skipped[str(exc)] += 1
            log.warning("skipping sample %s in shard %s: %s", raw.get("__key__"), raw.get("__url__"), exc)
            continue
        stats.decoded += 1
        yield " ".join(caption.split())


def train_tokenizer(shards: str, vocab_size: int, out: str | Path, model_type: TokenizerModel = "unigram",
                    max_samples: int = 1_000_000, allow_pipe: bool = False, progress: bool = True) -> dict:
    """Train a SentencePiece model on at most `max_samples` captions (0: all) of `shards` and
    write OUT/tokenizer.model (use it as model.text.tokenizer) and OUT/tokenizer.json (counts)."""
    import sentencepiece as spm

    if model_type not in TOKENIZER_MODELS:
        raise InputError(f"--model-type must be one of {', '.join(TOKENIZER_MODELS)}, got {model_type!r}")
    if vocab_size <= len(SPECIAL_IDS):
        raise InputError(f"--vocab-size must be more than {len(SPECIAL_IDS)}, got {vocab_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = ReadStats()
    captions = shard_captions(shards, stats, allow_pipe)
    if max_samples > 0:
        captions = itertools.islice(captions, max_samples)
    bar = tqdm(captions, desc="train-tokenizer", unit="caption", disable=not progress)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(bar), model_prefix=str(out / Path(TOKENIZER_FILE).stem), vocab_size=vocab_size,
            model_type=model_type, hard_vocab_limit=False, byte_fallback=True, character_coverage=0.9995,
            input_sentence_size=max_samples, shuffle_input_sentence=False, minloglevel=2, **SPECIAL_IDS)
    except RuntimeError as exc:
        if stats.decoded == 0:
            raise InputError(f"no usable caption in {shards} (skipped: {dict(stats.skipped)})") from exc
        raise InputError(f"SentencePiece could not train on {stats.decoded} captions of {shards}: {exc}") from exc
    finally:
        bar.close()
    trained = spm.SentencePieceProcessor(model_file=str(out / TOKENIZER_FILE))
    info = {"tokenizer": str(out / TOKENIZER_FILE), "shards": shards, "model_type": model_type,
            "vocab_size": trained.get_piece_size(), "requested_vocab_size": vocab_size,
            "captions": stats.decoded, "skipped": dict(stats.skipped)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return info
