"""The objects dataset's vocabulary and captions: class names with their glyphs, the named colours
of objects and backgrounds, the training wordings and the zero-shot prompts.

A training caption lists every object on the canvas, in a random order or left to right, in one
of several wordings (`TRAIN_TEMPLATES`), each object's colour sometimes and the background's
now and then. The zero-shot prompts (`EVAL_TEMPLATES`) share no word with any training caption
except the class name and the articles a/an, so zero-shot accuracy measures what the text
tower makes of wordings it never trained on (tests/test_objects_dataset.py checks this).
"""

from __future__ import annotations

import numpy as np

# class name, the DejaVu Sans glyph drawn for it
OBJECTS = (
    ("umbrella", "\u2602"), ("sun", "\u2600"), ("star", "\u2605"), ("heart", "\u2665"),
    ("airplane", "\u2708"), ("telephone", "\u260e"), ("anchor", "\u2693"), ("scissors", "\u2702"),
    ("horse", "\u265e"), ("music note", "\u266a"), ("cup", "\u2615"), ("cloud", "\u2601"),
    ("flag", "\u2691"), ("envelope", "\u2709"), ("snowflake", "\u2744"), ("crown", "\u265b"),
    ("moon", "\u263e"), ("flower", "\u273f"), ("pencil", "\u270f"), ("keyboard", "\u2328"),
)
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 210, 30), "green": (40, 160, 60),
    "blue": (40, 80, 220), "purple": (130, 50, 180), "pink": (240, 120, 180), "brown": (120, 70, 30),
    "black": (20, 20, 20), "white": (245, 245, 245), "grey": (128, 128, 128),
}
BACKGROUNDS = {
    "white": (250, 250, 250), "cream": (245, 235, 210), "light grey": (210, 210, 210),
    "light blue": (190, 215, 240), "light green": (200, 235, 200), "pale yellow": (250, 245, 190),
    "dark grey": (60, 60, 60), "black": (15, 15, 15), "navy": (20, 30, 80), "dark green": (20, 70, 40),
}
COUNTS = {1: "one object", 2: "two objects", 3: "three objects"}
# {objects}: the list of objects; {count}: "two objects"; {background}: the background's colour.
# The second field is the fewest objects a wording suits.
TRAIN_TEMPLATES = (
    ("{objects}", 1),
    ("a picture of {objects}", 1),
    ("{count}: {objects}", 1),
    ("an image with {objects}", 1),
    ("{objects} on a {background} background", 1),
    ("{objects} side by side", 2),
    ("from left to right: {objects}", 2),
)
LEFT_TO_RIGHT = "from left to right: {objects}"
# Colour and background words are rare: at 0.3 and 0.15, with one to three objects a canvas, a
# 600-step CPU run told a batch's pairs apart by colours and counts alone and learned no object
# (zero-shot 4.1%, a linear probe of its image embeddings 4.2%: chance is 5%). docs/quality.md.
COLOUR_PROBABILITY = 0.1  # per object; the class is always named
BACKGROUND_PROBABILITY = 0.05
# Zero-shot prompts: no word in common with the training captions but the class name and a/an.
EVAL_TEMPLATES = (
    "a photo showing the {}.",
    "the {}, seen up close.",
    "an illustration depicting the {}.",
    "a small {} icon.",
    "there is the {} here.",
)


def article(words: str) -> str:
    return f"an {words}" if words[0] in "aeiou" else f"a {words}"


def object_phrase(class_name: str, colour: str | None) -> str:
    """"a red umbrella", "an anchor", "a pair of blue scissors"."""
    if class_name == "scissors":
        return "a pair of " + (f"{colour} scissors" if colour else "scissors")
    return article(f"{colour} {class_name}" if colour else class_name)


def join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _left_to_right(objects: list[dict]) -> list[dict]:
    return sorted(objects, key=lambda o: (o["box"][0] + o["box"][2], o["box"][1]))


def train_caption(meta: dict, rng: np.random.Generator) -> str:
    """A caption that names every object of `meta` (from `objects.render`) once."""
    objects = meta["objects"]
    wordings = [t for t, fewest in TRAIN_TEMPLATES if len(objects) >= fewest]
    if rng.random() >= BACKGROUND_PROBABILITY:
        wordings = [t for t in wordings if "{background}" not in t]
    template = wordings[int(rng.integers(len(wordings)))]
    if template == LEFT_TO_RIGHT:
        order = _left_to_right(objects)
    else:
        order = [objects[i] for i in rng.permutation(len(objects))]
    phrases = [object_phrase(o["class_name"], o["colour"] if rng.random() < COLOUR_PROBABILITY else None)
               for o in order]
    return template.format(objects=join(phrases), count=COUNTS[len(objects)], background=meta["background"])


def full_caption(meta: dict, rng: np.random.Generator) -> str:
    """A caption that names every object with its colour, left to right (the retrieval set's)."""
    phrases = [object_phrase(o["class_name"], o["colour"]) for o in _left_to_right(meta["objects"])]
    wording = ("{objects}", "a picture of {objects}", LEFT_TO_RIGHT)[int(rng.integers(3))]
    return wording.format(objects=join(phrases))
