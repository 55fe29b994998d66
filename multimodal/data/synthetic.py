"""Procedurally drawn captioned scenes: the project's embedded, download-free data set.

Each scene holds coloured shapes with a size and a place, in one of three layouts: a single
shape somewhere on the canvas, two different shapes side by side, or a group of identical
shapes. Every image carries several captions in different phrasings. Retrieval on these needs
composition: "a red circle left of a blue square" and "a blue circle left of a red square"
share every word, and only binding colour to shape and shape to place tells them apart.
Scene `i` of a given seed is always the same picture with the same captions.
"""

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "large": 0.32}  # radius as a fraction of the canvas side
PLACES = {  # centre as fractions of the canvas side
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the middle": (0.5, 0.5),
}
NUMBERS = {2: "two", 3: "three"}


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str

    def phrase(self, article: bool = True) -> str:
        words = f"{self.size} {self.colour} {self.shape}"
        return f"a {words}" if article else words


@dataclass(frozen=True)
class SyntheticData:
    """How many synthetic scenes to write into the train and validation shard folders."""

    train_samples: int = 4096
    val_samples: int = 512
    image_size: int = 64
    shard_size: int = 512
    seed: int = 0


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, centre: tuple[float, float], side: int) -> None:
    r = SIZES[thing.size] * side * 0.5 if thing.shape != "circle" else SIZES[thing.size] * side * 0.45
    cx, cy = centre[0] * side, centre[1] * side
    fill = COLOURS[thing.colour]
    if thing.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif thing.shape == "square":
        draw.rectangle((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)


def _random_thing(rng: random.Random) -> Thing:
    return Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES)))


def _single(rng: random.Random):
    thing, place = _random_thing(rng), rng.choice(list(PLACES))
    captions = [
        f"{thing.phrase()} {place}",
        f"{place}, {thing.phrase()}",
        f"there is {thing.phrase()} {place}",
        f"one {thing.colour} {thing.shape}, {thing.size}, {place}",
        f"a picture of {thing.phrase()} {place}",
    ]
    return [(thing, PLACES[place])], captions


def _pair(rng: random.Random):
    left = _random_thing(rng)
    right = _random_thing(rng)
    while right == left:
        right = _random_thing(rng)
    captions = [
        f"{left.phrase()} to the left of {right.phrase()}",
        f"{right.phrase()} to the right of {left.phrase()}",
        f"on the left {left.phrase()}, on the right {right.phrase()}",
        f"{left.phrase()} and {right.phrase()}, from left to right",
        f"{right.phrase()} on the right and {left.phrase()} on the left",
    ]
    return [(left, (0.27, 0.5)), (right, (0.73, 0.5))], captions


def _group(rng: random.Random):
    thing = Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), "small")
    count = rng.choice(list(NUMBERS))
    word, plural = NUMBERS[count], f"{thing.colour} {thing.shape}s"
    slots = {2: [(0.27, 0.5), (0.73, 0.5)], 3: [(0.22, 0.3), (0.78, 0.3), (0.5, 0.75)]}[count]
    captions = [
        f"{word} small {plural}",
        f"{word} {plural}",
        f"a group of {word} {plural}",
        f"there are {word} small {plural}",
        f"{word} identical {plural}",
    ]
    return [(thing, c) for c in slots], captions


def mentions(caption: str) -> dict[str, frozenset[str]]:
    """The colours, shapes and number words ("two", "three") a caption names, shapes in the singular:
    what a caption of these scenes must get right, whatever its phrasing."""
    words = caption.lower().replace(",", " ").split()
    return {"colours": frozenset(w for w in words if w in COLOURS),
            "shapes": frozenset(w.removesuffix("s") for w in words if w.removesuffix("s") in SHAPES),
            "counts": frozenset(w for w in words if w in NUMBERS.values())}


def scene(index: int, seed: int = 0, side: int = 64, num_captions: int = 3) -> tuple[bytes, list[str], dict]:
    """The JPEG bytes, captions and layout record of scene `index`."""
    rng = random.Random(seed * 1_000_003 + index)
    layout = rng.choices((_single, _pair, _group), weights=(0.35, 0.45, 0.2))[0]
    things, captions = layout(rng)
    shade = rng.randint(20, 90)
    image = Image.new("RGB", (side, side), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for thing, centre in things:
        jitter = (centre[0] + rng.uniform(-0.04, 0.04), centre[1] + rng.uniform(-0.04, 0.04))
        _draw(draw, thing, jitter, side)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    chosen = rng.sample(captions, k=min(num_captions, len(captions)))
    record = {"layout": layout.__name__.strip("_"), "things": [vars(t) for t, _ in things]}
    return buf.getvalue(), chosen, record
