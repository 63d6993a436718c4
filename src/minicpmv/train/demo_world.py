"""What the demo model knows: its names, answer formats and limits (shared by training and evaluation).

The demo model answers questions about simple pictures: filled shapes of ``SHAPES`` in
``COLOURS`` on a plain (or gently shaded) background, and one line of printed text of up to
``MAX_CHARS`` letters and digits. Everything else is "outside its world" and gets ``REFUSAL``.
This module holds only that contract: the words the model uses and how an answer is spelled
(``position_name``, ``describe_shapes``, ...). It draws nothing: the training generator
(``synthetic.py``) and the independent evaluation generator (``demo_eval.py``) each draw their
own pictures and only agree on these names.
"""

from __future__ import annotations

import string

SHAPES = ("circle", "square", "rectangle", "triangle", "diamond", "star")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "black", "white")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
MAX_CHARS = 12
MAX_OBJECTS = 9
ORDINALS = ("first", "second")

REFUSAL = "I only know simple shapes, colours, counts, positions and text."
NO_TEXT = "I see no text."
NO_SHAPES = "I see no shapes."
NO_IMAGE = "Please show me a picture of shapes or text."


def plural(shape: str) -> str:
    return shape + "s"


def position_name(fx: float, fy: float) -> str:
    """3x3 position of a point given as fractions (0..1) of the picture's width and height."""
    col = min(int(fx * 3), 2)
    row = min(int(fy * 3), 2)
    return POSITIONS[row * 3 + col]


def describe_shapes(objects: list[tuple[str, str]]) -> str:
    """The answer to "What is in this image?" for shapes given as (colour, shape) pairs."""
    if len(objects) == 1:
        colour, shape = objects[0]
        return f"a {colour} {shape}"
    return f"{len(objects)} shapes"


def describe_text(text: str) -> str:
    return f'the text "{text}"'


def image_answer(index: int) -> str:
    """How an answer names one of two images ("the first image")."""
    return f"the {ORDINALS[index]} image"
