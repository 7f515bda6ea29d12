"""Calibrated strengths: the scale at which a direction moves its own attribute by a target amount.

A direction's strength is not comparable across directions (eq. 10 directions are unnormalised,
a disentangled one is shorter than its original, the toy and celebahq differ by orders of
magnitude), so a fixed scale compares edits of different sizes. ``calibrate`` finds, for every
direction at once, the scale s at which the mean change of its own attribute over the
calibration seeds equals ``target`` standard deviations of the attribute's unedited scores: a
search on f(s) = own change (:func:`search_scales`) from the point (0, 0) (an edit of scale 0
changes nothing) and ``start``, by secant steps until a point above and one below the target
bracket it, then by regula falsi inside the bracket. A response linear in s is solved exactly by
the first step; the search stops when |f(s) - target| <= rtol * target. The last measurement of
each direction (at the returned scale) also gives every other attribute's change: the
entanglement that ``disentangle.pairs: auto`` reads.

The measuring is :func:`measure_edits`: the model samples every (seed, edit) pair in batches and
the scorer (any callable images -> {attribute: (B,) scores}) reads them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def primary_direction(direction: str) -> str:
    """The direction a (possibly disentangled) direction derives from: 'glasses|hair' -> 'glasses'."""
    return direction.split("|", 1)[0]


def own_attribute(direction: str, mapping: dict[str, str] | None = None) -> str:
    """The measured attribute a direction targets: its primary name, or ``mapping[primary]``
    when the scorer names it differently (e.g. the CelebA 'Eyeglasses' direction is measured
    by CLIP's 'glasses')."""
    p = primary_direction(direction)
    return (mapping or {}).get(p, p)


def score(scorer: Callable, images: torch.Tensor, device=None) -> dict[str, np.ndarray]:
    """{attribute: (B,) float64} from a scorer of images (B, 3, H, W) in [-1, 1]."""
    with torch.no_grad():
        out = scorer(images if device is None else images.to(device))
    return {k: v.detach().double().cpu().numpy() for k, v in out.items()}


def measure_edits(model, scorer: Callable, seeds: Sequence[int], deltas: Sequence[torch.Tensor],
                  base: dict[str, np.ndarray], batch_size: int = 64, device=None) -> dict[str, np.ndarray]:
    """Per attribute, the score changes (E, S) of ``seeds`` under each of the E ``deltas`` against
    their unedited scores ``base`` ({attribute: (S,)}); one U-Net batch of ``batch_size`` images at
    a time, each scored and dropped."""
    seeds = list(seeds)
    pairs = [(s, d) for d in deltas for s in seeds]
    out = {a: np.empty(len(pairs)) for a in base}
    for idx, images in model.iter_edits(pairs, batch_size=batch_size):
        scores = score(scorer, images, device)
        for a in out:
            out[a][idx] = scores[a]
    return {a: out[a].reshape(len(deltas), len(seeds)) - np.asarray(base[a])[None] for a in out}


def search_scales(measure: Callable[[list[int], np.ndarray], np.ndarray], start: np.ndarray, target: float,
                  rtol: float = 0.05, max_iter: int = 6) -> dict:
    """Scales s_k with measure(s)_k = target > 0, for K responses at once.

    measure(indices, scales) -> the responses of those directions at those scales (each measured
    anew; the same scale must give the same response). Each round measures every unfinished
    direction once. A direction starts from (0, 0) and ``start``. While all its points lie below
    the target, it moves by a secant step through its last two points (clipped to a factor 10 per
    round). Once a point lies above the target, it and the point below the target closest to it
    ((0, 0) if none) bracket the target, and every later round stays inside the bracket: regula
    falsi, with the Illinois modification (the value at an end kept twice in a row is halved), which
    converges on any continuous response, however non-linear. A direction whose response at its
    start is not positive (it moves its attribute the other way, or not at all) gets no scale (NaN).
    The result is each direction's measured point closest to the target; a response with no point
    within ``rtol`` of it (e.g. a step function) ends unconverged, after ``max_iter`` rounds or once
    its bracket cannot shrink. Returns {"scales", "responses" (at those scales), "rounds",
    "converged" (bool per direction), "history" (per direction, [(scale, response), ...], from
    (0, 0))}."""
    start = np.asarray(start, dtype=float)
    K = len(start)
    history: list[list[tuple[float, float]]] = [[(0.0, 0.0)] for _ in range(K)]
    lo: list[list[float]] = [[0.0, -target] for _ in range(K)]  # bracket ends [s, f(s) - target], f(lo) < target
    hi: list[list[float] | None] = [None] * K  # f(hi) > target
    kept = [0] * K  # the end the last round kept: -1 lo, +1 hi
    scales, todo = start.copy(), list(range(K))
    done = np.zeros(K, bool)
    failed = np.zeros(K, bool)
    rounds = 0
    while todo and rounds < max_iter:
        f = np.asarray(measure(todo, scales[todo]), dtype=float)
        rounds += 1
        nxt = []
        for k, fk in zip(todo, f):
            s1, g1 = float(scales[k]), float(fk) - target
            history[k].append((s1, float(fk)))
            if abs(g1) <= rtol * target:
                done[k] = True
                continue
            if len(history[k]) == 2 and fk <= 0:
                failed[k] = True  # no secant through (0, 0) reaches a positive target
                continue
            if hi[k] is None and g1 < 0:  # no bracket yet: secant, as far as a factor 10
                if g1 > lo[k][1]:
                    lo[k] = [s1, g1]
                scales[k] = _secant_step(history[k], target)
                nxt.append(k)
                continue
            if hi[k] is None:
                hi[k] = [s1, g1]
            else:  # the new point replaces the end of its sign; the other end is kept
                side = 1 if g1 < 0 else -1
                if side == 1:
                    lo[k] = [s1, g1]
                else:
                    hi[k] = [s1, g1]
                if kept[k] == side:  # Illinois: an end kept twice in a row counts half
                    end = hi[k] if side == 1 else lo[k]
                    end[1] /= 2
                kept[k] = side
            (a, ga), (b, gb) = lo[k], hi[k]
            new = (a * gb - b * ga) / (gb - ga)
            if not min(a, b) < new < max(a, b):
                continue  # the bracket cannot shrink further
            scales[k] = new
            nxt.append(k)
        todo = nxt
    closest = [None if failed[k] or len(history[k]) < 2 else min(history[k][1:], key=lambda p: abs(p[1] - target))
               for k in range(K)]  # the measured point closest to the target
    return {"scales": np.array([np.nan if p is None else p[0] for p in closest]),
            "responses": np.array([np.nan if p is None else p[1] for p in closest]), "rounds": rounds,
            "converged": done.copy(), "history": history}


def _secant_step(history: list[tuple[float, float]], target: float) -> float:
    """The next scale of a direction whose points [(scale, response), ...] (from (0, 0)) all lie below
    the target: the secant through its last two points, as far as a factor 10 from the last one; where
    the response does not increase there, the linear guess through its best point."""
    (s0, f0), (s1, f1) = history[-2], history[-1]
    slope = (f1 - f0) / (s1 - s0) if s1 != s0 else 0.0
    if slope <= 0:  # not monotone here: the best point's linear guess
        sb, fb = max(history[1:], key=lambda p: p[1])
        new = sb * target / fb
    else:
        new = s1 + (target - f1) / slope
    return float(np.clip(new, s1 / 10, s1 * 10)) if s1 > 0 else new


def unedited_scores(model, scorer: Callable, seeds: Sequence[int], batch_size: int = 64, device=None) -> dict:
    """{attribute: (N,)} scores of the seeds' unedited samples."""
    out: dict[str, list] = {}
    for _, images in model.iter_edits([(int(s), None) for s in seeds], batch_size=batch_size):
        for a, v in score(scorer, images, device).items():
            out.setdefault(a, []).append(v)
    return {a: np.concatenate(v) for a, v in out.items()}


def calibrate(model, scorer: Callable, names: Sequence[str], directions: Sequence[torch.Tensor], seeds: Sequence[int],
              std_seeds: Sequence[int], start: float | Sequence[float], target: float = 1.0, rtol: float = 0.05,
              max_iter: int = 6, own: dict[str, str] | None = None, batch_size: int = 64, device=None,
              unedited: dict[str, np.ndarray] | None = None) -> dict:
    """The calibration record of named directions (each (T, C, H, W)): per direction the scale at
    which its own attribute (``own_attribute(name, own)``) moves by ``target`` standard deviations
    of the unedited scores over ``std_seeds`` (their first ones, ``seeds``, are edited), and the
    change of every attribute there (mean and standard error over the seeds, in those standard
    deviations): {"target", "seeds", "std_samples", "std", "scales", "own_effect", "effects", "se",
    "rounds", "converged"}. A direction with no scale (it does not move its attribute up) has
    null entries. ``unedited``: the scores of ``std_seeds`` unedited ({attribute: (N,)}, ``unedited_scores``),
    when already measured (a second file calibrated on the same seeds)."""
    seeds, std_seeds = [int(s) for s in seeds], [int(s) for s in std_seeds]
    base_all = unedited if unedited is not None else unedited_scores(model, scorer, std_seeds, batch_size, device)
    std = {a: float(np.std(v, ddof=1)) or 1.0 for a, v in base_all.items()}
    position = {s: i for i, s in enumerate(std_seeds)}
    base = {a: v[[position[s] for s in seeds]] for a, v in base_all.items()}
    attrs = list(std)
    owns = [own_attribute(n, own) for n in names]
    missing = sorted({o for o in owns if o not in std})
    if missing:
        raise KeyError(f"the scorer gives no {missing} (it gives {attrs}); set evaluate.own_attribute")
    last: dict[int, dict[str, np.ndarray]] = {}

    def measure(todo: list[int], scales: np.ndarray) -> np.ndarray:
        changes = measure_edits(model, scorer, seeds, [float(s) * directions[k] for k, s in zip(todo, scales)], base,
                                batch_size, device)
        out = []
        for j, k in enumerate(todo):
            per_seed = {a: changes[a][j] / std[a] for a in attrs}
            last.setdefault(k, {})[float(scales[j])] = per_seed
            out.append(float(per_seed[owns[k]].mean()))
        return np.array(out)

    starts = np.broadcast_to(np.asarray(start, dtype=float), (len(names),)).copy()
    found = search_scales(measure, starts, target, rtol, max_iter)
    record = {"target": float(target), "unit": "standard deviations of the unedited scores", "seeds": seeds,
              "std_samples": len(std_seeds), "std": std, "rounds": int(found["rounds"]),
              "scales": {}, "own_effect": {}, "effects": {}, "se": {}, "converged": {}}
    n = len(seeds)
    for k, name in enumerate(names):
        s = found["scales"][k]
        ok = bool(np.isfinite(s))
        per_seed = last[k][float(s)] if ok else None
        record["scales"][name] = float(s) if ok else None
        record["own_effect"][name] = float(found["responses"][k]) if ok else None
        record["effects"][name] = {a: float(v.mean()) for a, v in per_seed.items()} if ok else None
        record["se"][name] = {a: float(v.std(ddof=1) / np.sqrt(n)) for a, v in per_seed.items()} if ok else None
        record["converged"][name] = bool(found["converged"][k])
    return record


def entangled_with(record: dict, name: str, candidates: dict[str, str], threshold: float,
                   min_z: float = 2.0) -> dict[str, float]:
    """The directions among ``candidates`` (direction -> its attribute) whose attribute direction
    ``name`` measurably moves at its calibrated scale: |mean change| >= ``threshold`` standard
    deviations and >= ``min_z`` standard errors. Returns {direction: signed mean change}."""
    effects, se = (record.get("effects") or {}).get(name), (record.get("se") or {}).get(name)
    if not effects:
        return {}
    out = {}
    for other, attr in candidates.items():
        if other == name or attr not in effects:
            continue
        m, e = effects[attr], se[attr]
        if abs(m) >= threshold and abs(m) >= min_z * e:
            out[other] = m
    return out


def calibrated_scale(params: dict, name: str) -> float | None:
    """The calibrated strength of direction ``name`` stored in a directions file's params, or None."""
    scale = ((params or {}).get("calibration") or {}).get("scales", {}).get(name)
    return None if scale is None else float(scale)
