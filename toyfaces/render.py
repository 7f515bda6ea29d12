"""Procedural toy faces with known factors: the embedded default's ground truth.

Every face is drawn from a handful of named factors at 4x resolution with PIL and
box-downsampled to 32x32, so edges are anti-aliased. Features are deliberately large and
high-contrast (a mouth arc spanning most of the face, big eyes, bold glasses frames) so a
tiny DDPM can learn them on a CPU.

Factors (name: range, meaning):

- ``smile``:    [-1, 1]  signed mouth curvature; -1 frown, 0 straight, +1 broad smile.
- ``eye_open``: [0, 1]   eye openness; 0 closed (a line), 1 wide open.
- ``glasses``:  {0, 1}   bold dark glasses frames (P(1) = 0.4).
- ``hat``:      {0, 1}   a red hat covering the top of the head (P(1) = 0.4).
- ``yaw``:      [-1, 1]  head turn; +1 turned to the viewer's right (features shift right,
                         the nose points right, the far eye narrows).
- ``hair``:     [0, 1]   hair darkness; 0 blond, 1 black.
- ``background``: {0, 1, 2, 3}  nuisance: index into a small palette of pale colours.

Factors are independent by default. ``correlations={"glasses~hair": 0.6}`` correlates
chosen pairs through a Gaussian copula: each factor is a monotone function of one standard
normal, and the normals get the requested correlation. Continuous factors stay uniform on
their range and binary ones keep their rate, whatever the correlation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw
from scipy.special import ndtr, ndtri

RESOLUTION = 32
_SCALE = 4  # drawn at 4x and box-downsampled for anti-aliasing
_ZOOM = 1.3  # canvas pixels (at 4x) per layout unit: the face fills most of the frame


@dataclass(frozen=True)
class Factor:
    """One generative factor: continuous uniform on [low, high], or binary with rate p."""

    name: str
    kind: str  # "continuous" | "binary" | "categorical"
    low: float = 0.0
    high: float = 1.0
    p: float = 0.5  # P(1) for binary factors
    levels: int = 0  # number of categories for categorical factors

    @property
    def std(self) -> float:
        """Standard deviation of the factor under the renderer's distribution."""
        if self.kind == "continuous":
            return (self.high - self.low) / np.sqrt(12.0)
        if self.kind == "binary":
            return float(np.sqrt(self.p * (1 - self.p)))
        return float(np.sqrt((self.levels**2 - 1) / 12.0))


FACTORS: tuple[Factor, ...] = (
    Factor("smile", "continuous", -1.0, 1.0),
    Factor("eye_open", "continuous", 0.0, 1.0),
    Factor("glasses", "binary", p=0.4),
    Factor("hat", "binary", p=0.4),
    Factor("yaw", "continuous", -1.0, 1.0),
    Factor("hair", "continuous", 0.0, 1.0),
    Factor("background", "categorical", levels=4),
)
FACTOR_NAMES: tuple[str, ...] = tuple(f.name for f in FACTORS)
#: The factors that carry meaning (the annotator reads these; background is a nuisance).
SEMANTIC_FACTORS: tuple[str, ...] = FACTOR_NAMES[:-1]

BACKGROUNDS = np.array([(196, 216, 232), (212, 228, 196), (234, 218, 196), (208, 208, 214)])
SKIN = (236, 194, 160)
HAIR_LIGHT = np.array([232, 196, 110])
HAIR_DARK = np.array([34, 26, 22])
HAT = (178, 30, 36)
MOUTH = (140, 24, 40)
MOUTH_INSIDE = (70, 12, 24)
TEETH = (248, 248, 240)
INK = (24, 20, 24)


def factor(name: str) -> Factor:
    for f in FACTORS:
        if f.name == name:
            return f
    raise KeyError(f"unknown toy-face factor {name!r}; factors are {list(FACTOR_NAMES)}")


def _pair(key: str | tuple[str, str]) -> tuple[str, str]:
    if isinstance(key, str):
        parts = key.split("~")
        if len(parts) != 2:
            raise ValueError(f"correlation key {key!r} must name two factors as 'a~b'")
        return parts[0].strip(), parts[1].strip()
    return key


def correlation_matrix(correlations: Mapping | None) -> np.ndarray:
    """Correlation of the copula's normals, (F, F), from {"a~b": rho} (or {(a, b): rho})."""
    corr = np.eye(len(FACTORS))
    for key, rho in (correlations or {}).items():
        a, b = _pair(key)
        i, j = FACTOR_NAMES.index(factor(a).name), FACTOR_NAMES.index(factor(b).name)
        if i == j or not -1 < rho < 1:
            raise ValueError(f"correlation {a}~{b}={rho}: need two different factors and |rho| < 1")
        corr[i, j] = corr[j, i] = rho
    if np.linalg.eigvalsh(corr).min() <= 0:
        raise ValueError(f"correlations {dict(correlations)} do not form a valid correlation matrix")
    return corr


def sample_factors(
    n: int, seed: int | np.random.SeedSequence, correlations: Mapping | None = None
) -> dict[str, np.ndarray]:
    """Draw ``n`` factor vectors from their own RNG; returns {name: (n,) float64}."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(FACTORS))) @ np.linalg.cholesky(correlation_matrix(correlations)).T
    u = ndtr(z)  # uniform marginals
    out = {}
    for k, f in enumerate(FACTORS):
        if f.kind == "continuous":
            out[f.name] = f.low + (f.high - f.low) * u[:, k]
        elif f.kind == "binary":
            out[f.name] = (z[:, k] > ndtri(1 - f.p)).astype(np.float64)
        else:
            out[f.name] = np.minimum(np.floor(u[:, k] * f.levels), f.levels - 1)
    return out


def render_face(**factors: float) -> np.ndarray:
    """One face, (32, 32, 3) uint8, from factor values (missing factors take neutral values).
    Values outside a factor's range are clamped to it: a reader's estimate of an edited face
    (``toy_consistency``) can fall a little outside, and is drawn as the nearest valid face."""
    s = _SCALE
    smile = float(np.clip(factors.get("smile", 0.0), -1.0, 1.0))
    eye_open = float(np.clip(factors.get("eye_open", 0.7), 0.0, 1.0))
    glasses = bool(factors.get("glasses", 0) > 0.5)
    hat = bool(factors.get("hat", 0) > 0.5)
    yaw = float(np.clip(factors.get("yaw", 0.0), -1.0, 1.0))
    hair = float(np.clip(factors.get("hair", 0.5), 0.0, 1.0))
    bg = int(np.clip(round(float(factors.get("background", 0))), 0, len(BACKGROUNDS) - 1))

    size = RESOLUTION * s
    img = Image.new("RGB", (size, size), tuple(int(c) for c in BACKGROUNDS[bg]))
    d = ImageDraw.Draw(img)
    hair_rgb = tuple(int(c) for c in np.round(HAIR_LIGHT + hair * (HAIR_DARK - HAIR_LIGHT)))

    # layout in units of a 100-unit face box centred on the canvas, mapped by `at`
    def at(x: float, y: float) -> tuple[float, float]:
        return (size / 2 + _ZOOM * x, size / 2 + 4 + _ZOOM * y)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return at(x0, y0) + at(x1, y1)

    cx = 4 * yaw  # head centre shifts a little with yaw ...
    fx = 13 * yaw  # ... and the features shift further
    # hair behind the head, then the face, then the fringe over the forehead
    d.ellipse(box(cx - 38, -44, cx + 38, 36), fill=hair_rgb)
    d.ellipse(box(cx - 31, -34, cx + 31, 48), fill=SKIN)
    d.chord(box(cx - 34, -42, cx + 34, 12), 180, 360, fill=hair_rgb)

    # eyes: big whites whose height is the openness, each nearly filled by a dark iris that
    # grows with it, so that openness is a large dark area (open: two dark discs about 6 px
    # across at 32x32; closed: a thin line) and not only a pale white one
    eye_y, ry = 0, 1.5 + 12.5 * eye_open
    for side in (-1, 1):
        ex = fx + side * 15
        rx = 12.5 * (1 - 0.3 * max(0.0, side * -yaw))  # the far eye narrows
        d.ellipse(box(ex - rx, eye_y - ry, ex + rx, eye_y + ry), fill=(250, 250, 250), outline=INK, width=4)
        pr = min(9.0, ry, rx - 2)
        px = ex + 3 * yaw
        d.ellipse(box(px - pr, eye_y - pr, px + pr, eye_y + pr), fill=INK)
        if glasses:
            d.ellipse(box(ex - 16.5, eye_y - 16, ex + 16.5, eye_y + 16), outline=INK, width=6)
    if glasses:
        d.line(at(fx - 1.5, eye_y - 2) + at(fx + 1.5, eye_y - 2), fill=INK, width=6)
        d.line(at(fx - 31.5, eye_y - 3) + at(cx - 33, eye_y - 5), fill=INK, width=5)
        d.line(at(fx + 31.5, eye_y - 3) + at(cx + 33, eye_y - 5), fill=INK, width=5)

    # nose: a short wedge pointing along the yaw, below the eyes
    d.polygon([at(fx - 4, 14), at(fx + 4, 14), at(fx + 9 * yaw, 24)], fill=(206, 150, 120))

    # mouth: corners rise by 5 units for smile=+1 and drop for -1 (a thick arc); a smile also
    # opens the mouth into a dark crescent with a band of teeth whose height grows with the
    # smile, so that smiling is an area of the face and not only a 1-pixel bend at 32x32
    u = np.linspace(-1, 1, 25)
    bulge = 1 - u**2
    half = 18 + 6 * max(smile, 0.0)
    corner = 31 - 5 * smile
    upper = corner + 5 * smile * bulge
    if smile > 0:
        lower = upper + 15 * smile * bulge
        teeth = upper + 9 * smile * bulge
        xs = fx + half * u
        d.polygon([at(x, y) for x, y in zip(xs, upper)] + [at(x, y) for x, y in zip(xs[::-1], lower[::-1])],
                  fill=MOUTH_INSIDE)
        d.polygon([at(x, y) for x, y in zip(xs, upper)] + [at(x, y) for x, y in zip(xs[::-1], teeth[::-1])],
                  fill=TEETH)
        d.line([at(x, y) for x, y in zip(xs, lower)], fill=MOUTH, width=6, joint="curve")
    d.line([at(fx + half * ui, yi) for ui, yi in zip(u, upper)], fill=MOUTH, width=8, joint="curve")

    if hat:
        d.polygon([at(cx - 28, -26), at(cx + 28, -26), at(cx + 22, -52), at(cx - 22, -52)], fill=HAT)
        d.rectangle(box(cx - 44, -30, cx + 44, -21), fill=HAT)
    return np.asarray(img.resize((RESOLUTION, RESOLUTION), Image.BOX))


def render_faces(factors: Mapping[str, np.ndarray]) -> np.ndarray:
    """Faces for a batch of factor vectors: {name: (n,)} -> (n, 32, 32, 3) uint8."""
    n = len(next(iter(factors.values())))
    return np.stack([render_face(**{k: v[i] for k, v in factors.items()}) for i in range(n)])
