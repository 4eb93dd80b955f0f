"""Synthetic image-question sets drawn with PIL: a "general" set the demo model is pre-trained on
(colour and shape names) and a new "target" task it is fine-tuned on (where the shape is).

Every item is a function of (task, split, index), so held-out evaluation items never overlap the
training stream: the splits draw from disjoint seed ranges.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 24  # 3x3 patches of 8 pixels: each position below is one patch
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 230),
    "yellow": (235, 215, 30), "purple": (140, 40, 180), "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Where the shape's centre sits (fractions of the image side): the target task's answers.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (1 / 6, 0.5), "right": (5 / 6, 0.5), "top": (0.5, 1 / 6), "bottom": (0.5, 5 / 6), "center": (0.5, 0.5),
}
BACKGROUNDS = ((255, 255, 255),)
SHADES = (0.8, 0.9, 1.0)  # colour brightness: variety without moving the shape out of its patch

# Questions per task: (question, attribute the answer names).
TASKS: dict[str, tuple[tuple[str, str], ...]] = {
    "general": (("what is the colour of the shape ?", "colour"), ("what shape is in the image ?", "shape")),
    "target": (("where is the shape ?", "position"),),
}
# Disjoint seed offsets per split: an eval item can never be a training item.
SPLIT_OFFSETS = {"train": 0, "eval": 10_000_000, "probe": 20_000_000}


@dataclass(frozen=True)
class Item:
    image: Image.Image
    question: str
    answer: str
    key: tuple  # (colour, shape, position, background, shade): the image's content


def draw(colour: str, shape: str, position: str, background: tuple[int, int, int], shade: float,
         size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    fx, fy = POSITIONS[position]
    cx, cy = int(fx * size), int(fy * size)
    half = size // 8  # a 7-pixel shape inside its 8-pixel patch
    fill = tuple(int(shade * c) for c in COLOURS[colour])
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle((cx - half + 1, cy - half + 1, cx + half - 1, cy + half - 1), fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    else:  # cross
        arm = max(1, half // 3)
        pen.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
        pen.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
    return image


def is_held_out(key: tuple, question: str) -> bool:
    """About one (image, question) pair in five is reserved for evaluation and never drawn for training."""
    return zlib.crc32(repr((key, question)).encode()) % 5 == 0


def make_item(task: str, split: str, index: int, seed: int = 0) -> Item:
    """Item `index` of `task`/`split`: deterministic in (seed, split, index); eval items come only from the
    held-out part of the (image, question) space, training items only from the rest."""
    rng = random.Random(f"{seed}:{SPLIT_OFFSETS[split] + index}:{task}")
    while True:
        item = _draw_item(task, rng)
        if is_held_out(item.key, item.question) == (split != "train"):
            return item


def _draw_item(task: str, rng: random.Random) -> Item:
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    position = rng.choice(sorted(POSITIONS))
    background = rng.choice(BACKGROUNDS)
    shade = rng.choice(SHADES)
    question, attribute = rng.choice(TASKS[task])
    answer = {"colour": colour, "shape": shape, "position": position}[attribute]
    return Item(draw(colour, shape, position, background, shade), question, answer,
                (colour, shape, position, background, shade))


def make_set(task: str, split: str, count: int, seed: int = 0) -> list[Item]:
    return [make_item(task, split, i, seed) for i in range(count)]


def answers_of(task: str) -> list[str]:
    names = {"colour": sorted(COLOURS), "shape": list(SHAPES), "position": sorted(POSITIONS)}
    return sorted({a for _, attribute in TASKS[task] for a in names[attribute]})
