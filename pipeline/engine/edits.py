"""Edits of h while sampling: the :class:`Edit` value a caller gives, checked once into a
:class:`StepEdits` (the edit schedule of a batch), which applies it to the hook at each step.

Shapes: h_shape is h's per-sample shape at the hook ((C, H, W) in a U-Net, (N, C) in a
transformer); T the number of sampling steps; B the batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.engine.hooks import HSpaceHook
from pipeline.errors import InputError


@dataclass(frozen=True)
class Edit:
    """What to do to a sample while it is drawn (paper Sec. 3).

    delta: (T, *h_shape), the same for every sample, or (B, T, *h_shape): added to h.
    replace: the same shapes: h is replaced (the paper's Fig. 3 swap), before ``delta`` is added.
    steps: step indices where ``delta`` and ``replace`` apply (default: every step; 0 = first, noisiest).
    asyrp: D_t from a second, unedited pass (Asyrp) instead of the edited one (one more pass per edited step).
    dx_T: (*latent_shape) or (B, *latent_shape): added to x_T (the noise-space baseline, Fig. 8).
    """

    delta: torch.Tensor | None = None
    replace: torch.Tensor | None = None
    steps: Sequence[int] | None = None
    asyrp: bool = False
    dx_T: torch.Tensor | None = None

    def for_batch(self, batch: int, num_steps: int, h_shape: tuple, latent_shape: tuple,
                  device: torch.device) -> StepEdits:
        """This edit checked against a batch (shapes, step range, finite values): its schedule."""
        delta = _per_sample(self.delta, "delta", batch, num_steps, h_shape, device)
        replace = _per_sample(self.replace, "replace", batch, num_steps, h_shape, device)
        return StepEdits(delta, replace, _step_mask(self.steps, num_steps), bool(self.asyrp),
                         _offset(self.dx_T, batch, latent_shape, device))


NO_EDIT = Edit()


def _finite(value: torch.Tensor, name: str) -> torch.Tensor:
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise InputError(f"Edit.{name} has non-finite values (nan or inf); give finite numbers")
    return value


def _per_sample(value, name: str, batch: int, T: int, h_shape: tuple, device) -> torch.Tensor | None:
    """(T, *h_shape) shared by all, or (B, T, *h_shape) -> (B, T, *h_shape) float32 on ``device``."""
    if value is None:
        return None
    value = _finite(torch.as_tensor(value), name)
    if tuple(value.shape) == (T, *h_shape):
        value = value.unsqueeze(0).expand(batch, *value.shape)
    elif tuple(value.shape) != (batch, T, *h_shape):
        raise InputError(f"Edit.{name} has shape {tuple(value.shape)}; expected (T, *h_shape) = {(T, *h_shape)} "
                         f"or (B, T, *h_shape) = {(batch, T, *h_shape)}")
    return value.to(device=device, dtype=torch.float32)


def _offset(value, batch: int, latent_shape: tuple, device) -> torch.Tensor | None:
    if value is None:
        return None
    value = _finite(torch.as_tensor(value, dtype=torch.float32), "dx_T")
    if tuple(value.shape) != tuple(latent_shape) and (
            value.ndim != len(latent_shape) + 1 or tuple(value.shape[1:]) != tuple(latent_shape)
            or len(value) not in (1, batch)):
        raise InputError(f"Edit.dx_T has shape {tuple(value.shape)}; expected {tuple(latent_shape)} or "
                         f"(B, *{tuple(latent_shape)})")
    return value.to(device)


def _step_mask(steps, T: int) -> list[bool]:
    if steps is None:
        return [True] * T
    steps = [int(s) for s in steps]
    bad = [s for s in steps if not 0 <= s < T]
    if bad:
        raise InputError(f"steps {bad} out of range: step indices run 0..{T - 1} (0 = first, noisiest)")
    return [i in set(steps) for i in range(T)]


@dataclass(frozen=True)
class StepEdits:
    """An :class:`Edit` checked for one batch: per-sample delta and replace (B, T, *h_shape) on the
    model's device, the steps where they apply, Asyrp, and the x_T offset."""

    delta: torch.Tensor | None
    replace: torch.Tensor | None
    mask: list[bool]
    asyrp: bool
    dx_T: torch.Tensor | None

    def edits(self, step: int) -> bool:
        """Whether h is edited at step index ``step``."""
        return self.mask[step] and (self.delta is not None or self.replace is not None)

    def second_pass(self, step: int) -> bool:
        """Whether the step takes eps_t from a second, unedited pass (Asyrp)."""
        return self.asyrp and self.edits(step)

    @contextlib.contextmanager
    def applied(self, hook: HSpaceHook, step: int):
        """Within the block, the network's passes carry this edit's step ``step`` (nothing where it does not edit)."""
        if not self.edits(step):
            yield
            return
        with hook.editing(None if self.delta is None else self.delta[:, step],
                          None if self.replace is None else self.replace[:, step]):
            yield


def stacked_edit(edits: Sequence[torch.Tensor | None], shape: tuple[int, ...], space: str, asyrp: bool = False):
    """One Edit for a batch of per-sample edits, each ``shape`` or None (no edit; None for the whole batch
    when no sample has one): added to h (``space="h"``, shape (T, *h_shape)) or to x_T (``"x_T"``)."""
    if all(e is None for e in edits):
        return None
    delta = torch.stack([torch.zeros(shape, dtype=torch.float32) if e is None
                         else torch.as_tensor(e, dtype=torch.float32, device="cpu") for e in edits])
    return Edit(delta=delta, asyrp=asyrp) if space == "h" else Edit(dx_T=delta)


#: keywords of the API before the Edit value and the one precision setting -> what says it now
RENAMED = {"delta_h": "Edit(delta=...)", "replace_h": "Edit(replace=...)", "dx_T": "Edit(dx_T=...)",
           "steps": "Edit(steps=...)", "asyrp": "Edit(asyrp=...)", "dtype": "precision= ('16-true', 'bf16-true', ...)"}


def refuse_renamed(kwargs: dict) -> None:
    """A keyword of the earlier API is one line saying what replaced it."""
    old = [k for k in kwargs if k in RENAMED]
    if old:
        raise InputError("; ".join(f"{k}= is now {RENAMED[k]}" for k in old)
                         + " (model.sample(seeds, Edit(delta=...)); HSpaceModel.from_pretrained(name, precision=...))")
