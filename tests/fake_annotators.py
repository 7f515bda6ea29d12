"""Annotators with known responses, for the stage tests (importable as "fake_annotators:...")."""
from __future__ import annotations

import time

from annotators.base import Annotator


class Brightness(Annotator):
    """bright: mean of the image in [0, 1] units; red: mean of the red channel minus the rest."""

    name = "brightness"
    attributes = ("bright", "red")

    def __init__(self, delay: float = 0.0, prefix: str = ""):
        self.delay = delay
        if prefix:
            self.attributes = tuple(f"{prefix}{a}" for a in Brightness.attributes)

    def score(self, x):
        time.sleep(self.delay)
        x01 = x * 0.5 + 0.5
        names = self.attributes
        return {names[0]: x01.mean(dim=(1, 2, 3)), names[1]: x01[:, 0].mean(dim=(1, 2)) - x01[:, 1:].mean(dim=(1, 2, 3))}


def brightness(**kw):
    return Brightness(**kw)


def darkness(**kw):
    """Same attribute names as brightness, negated: to test column-name collisions."""
    b = Brightness(**kw)
    b.name = "darkness"
    original = b.score
    b.score = lambda x: {k: -v for k, v in original(x).items()}
    return b


class Broken(Annotator):
    """bright, but NaN for the second image of every batch (``value``: what it gives there)."""

    name = "broken"
    attributes = ("bright",)

    def __init__(self, value: float = float("nan")):
        self.value = value

    def score(self, x):
        out = (x * 0.5 + 0.5).mean(dim=(1, 2, 3))
        out[1:2] = self.value
        return {"bright": out}
