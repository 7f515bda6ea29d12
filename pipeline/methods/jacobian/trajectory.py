"""Model glue: ``f(h) = mask * eps_t(x_t, h)`` of a sample's own trajectory, the directions at one
step or at every step (:class:`JacobianDirections`), and the "global at index" edit."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from pipeline.errors import InputError
from pipeline.methods.jacobian.basis import DEFAULT_MAX_ITER, DEFAULT_TOL
from pipeline.methods.jacobian.products import Fn
from pipeline.methods.jacobian.solve import DEFAULT_METHOD, top_singular
from pipeline.methods.signs import agreement_signs


def check_mask(mask, image_shape: Sequence[int]) -> torch.Tensor:
    """An image-region mask (H, W), (1, H, W) or (3, H, W) with values in [0, 1] -> (c, H, W) float."""
    C, H, W = image_shape
    m = torch.as_tensor(mask).detach().clone().float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or tuple(m.shape[1:]) != (H, W) or m.shape[0] not in (1, C):
        raise InputError(f"mask has shape {tuple(torch.as_tensor(mask).shape)}; expected (H, W) = {(H, W)}, "
                         f"(1, H, W) or ({C}, H, W) = {(C, H, W)}")
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise InputError("mask values must lie in [0, 1]")
    if m.max() == 0:
        raise InputError("mask is all zero: the masked Jacobian vanishes, no direction can be found")
    return m


def latent_mask(model, mask) -> torch.Tensor:
    """A mask for x_t: checked as :func:`check_mask`; for latent models an image-space mask is
    averaged onto the latent grid (a mask already at the latent grid's size is taken as it is)."""
    if tuple(model.latent_shape) == tuple(model.image_shape):
        return check_mask(mask, model.image_shape)
    if tuple(torch.as_tensor(mask).shape[-2:]) == tuple(model.latent_shape[-2:]):
        return check_mask(mask, model.latent_shape)
    m = check_mask(mask, model.image_shape).mean(0, keepdim=True)
    return torch.nn.functional.interpolate(m[None], size=tuple(model.latent_shape[-2:]), mode="area")[0]


def eps_function(model, x_t: torch.Tensor, step: int, mask: torch.Tensor | None = None) -> Fn:
    """f(h) = mask * eps_t(x_t, h), batched and flattened: (b, prod(h_shape)) -> (b, prod(latent_shape)).

    x_t: (*latent_shape) or (1, *latent_shape); mask: as :func:`latent_mask` (None: the whole
    image). eps is the guided noise prediction of a text model (its default prompt; an offset of h
    moves both guidance branches, as an edit does); a flow model's velocity, with the same directions
    (:meth:`~pipeline.engine.schedules.base.Schedule.jacobian_output`).
    """
    x = x_t.detach().reshape(1, *model.latent_shape).to(model.device).clone()
    m = None if mask is None else latent_mask(model, mask).to(model.device)

    def f(hb: torch.Tensor) -> torch.Tensor:
        b = hb.shape[0]
        x0, eps = model.predict_given_h(x.expand(b, *model.latent_shape), step, hb.reshape(b, *model.h_shape))
        eps = model.schedule.jacobian_output(x0, eps, step).float()
        if m is not None:
            eps = eps * m
        return eps.reshape(b, -1)

    return f


def _get(sample, name: str):
    if isinstance(sample, Mapping):
        return sample.get(name)
    return getattr(sample, name, None)


def sample_trajectory(model, sample) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample's own trajectory: x_t entering every step (T, *latent_shape) and h_t (T, *h_shape).

    sample: a seed (int); or a :class:`~pipeline.engine.model.SampleOutput`-like object / dict of ONE
    sample with ``x_T`` ((1, 3, H, W) or (3, H, W)) and, for eta > 0, its step noise ``noise``
    ((1, T, 3, H, W)) or ``seeds``/``seed``. If it already carries ``latents`` and ``h`` these are
    used as they are (no re-sampling).
    """
    T = model.num_steps
    with torch.inference_mode(False):
        if isinstance(sample, bool) or sample is None:
            raise InputError(f"sample must be a seed (int) or a SampleOutput / dict with x_T; got {sample!r}")
        if isinstance(sample, int) or (hasattr(sample, "__index__") and not isinstance(sample, torch.Tensor)):
            out = model.sample([int(sample)], return_latents=True)
            return out.latents[0].clone(), out.h[0].float().clone()
        latents, h = _get(sample, "latents"), _get(sample, "h")
        if latents is not None and h is not None:
            latents, h = torch.as_tensor(latents), torch.as_tensor(h)
            if latents.ndim == 2 + len(model.latent_shape):  # a batch (B, T, *latent_shape)
                if len(latents) != 1 or h.ndim != 2 + len(model.h_shape) or len(h) != 1:
                    raise InputError(f"give one sample, not a batch of {len(latents)}: slice it (e.g. out.latents[i:i+1])")
                latents, h = latents[0], h[0]
            if latents.shape[0] != T or h.shape[0] != T:
                raise InputError(f"sample has {latents.shape[0]} steps; the model samples with T={T}")
            return latents.clone().float(), h.clone().float()
        x_T = _get(sample, "x_T")
        if x_T is None:
            raise InputError("sample must be a seed (int) or carry x_T (a SampleOutput or a dict with 'x_T')")
        x_T = torch.as_tensor(x_T).clone().float()
        if x_T.ndim == 3:
            x_T = x_T[None]
        if x_T.ndim != 4 or len(x_T) != 1:
            raise InputError(f"give one sample: x_T has shape {tuple(x_T.shape)}, expected (1, 3, H, W) or (3, H, W); "
                             f"slice a batch first")
        noise = _get(sample, "noise")
        seeds = _get(sample, "seeds")
        if seeds is None and _get(sample, "seed") is not None:
            seeds = [int(_get(sample, "seed"))]
        if noise is not None:
            noise = torch.as_tensor(noise).clone().float()
            if noise.ndim == 4:
                noise = noise[None]
        stochastic = bool((model.coefficients().sigma > 0).any())
        if stochastic and noise is None and seeds is None:
            raise InputError("eta > 0: the Jacobian must be taken on the sample's own trajectory; "
                             "give its step noise ('noise', (1, T, 3, H, W)) or its seed")
        out = model.sample(seeds=None if seeds is None else list(seeds), x_T=x_T, noise=noise, return_latents=True)
        return out.latents[0].clone(), out.h[0].float().clone()


def _check_step(model, step) -> int:
    T = model.num_steps
    if isinstance(step, bool) or not (isinstance(step, int) or hasattr(step, "__index__")):
        raise InputError(f"step must be an int step index, got {step!r}")
    step = int(step)
    if not 0 <= step < T:
        raise InputError(f"step {step} out of range: step indices run 0..{T - 1} (0 = first, noisiest)")
    return step


@dataclass
class JacobianDirections:
    """Top-k directions of one sample (``J v_i = s_i u_i``) at one step, or at several steps.

    One step (:func:`jacobian_directions`, :func:`directions_at`): directions (k, C, H, W) unit right
    singular vectors; singular_values (k,) descending; left (k, 3, H, W) unit left singular vectors
    (in eps space); residuals (k,) relative residuals; iterations: int; converged: bool; steps:
    [step]. Several steps (:func:`jacobian_directions_all_steps`): each tensor gains a leading axis
    over the T' ``steps``, iterations (T',) and converged (T',) become tensors. passes: batched
    U-Net passes by kind, vectors: vectors through J / J^T (totals over the steps). fallback: True
    where ``method`` stopped short and the default method finished the search ((T',) over steps).
    """

    directions: torch.Tensor
    singular_values: torch.Tensor
    left: torch.Tensor
    steps: list[int]
    iterations: int | torch.Tensor
    converged: bool | torch.Tensor
    residuals: torch.Tensor
    method: str
    passes: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, int] = field(default_factory=dict)
    fallback: bool | torch.Tensor = False


def directions_at(model, x_t: torch.Tensor, h_t: torch.Tensor, step: int, k: int, *, mask=None,
                  method: str = "auto", block: int | None = None, tol: float = DEFAULT_TOL,
                  max_iter: int = DEFAULT_MAX_ITER, init: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, **kw: Any) -> JacobianDirections:
    """Directions at a given point: x_t (3, H, W), h_t (C, H, W) at step index ``step``."""
    step = _check_step(model, step)
    h_t = torch.as_tensor(h_t)
    if tuple(h_t.shape[-len(model.h_shape):]) != tuple(model.h_shape) or h_t.numel() != math.prod(model.h_shape):
        raise InputError(f"h_t has shape {tuple(h_t.shape)}; expected {tuple(model.h_shape)}")
    if _is_inference(model):
        raise InputError("the model's weights are inference tensors (created under torch.inference_mode()); "
                         "build the model outside inference mode to differentiate through it")
    f = eps_function(model, x_t, step, mask)
    out = top_singular(f, h_t.to(model.device, torch.float32), k, method=method, block=block, tol=tol,
                       max_iter=max_iter, init=init, generator=generator, **kw)
    return JacobianDirections(
        singular_values=out.singular_values.float().cpu(),
        directions=out.V.float().reshape(-1, *model.h_shape).cpu(),
        left=out.U.float().reshape(-1, *model.latent_shape).cpu(),
        steps=[step], method=DEFAULT_METHOD if method == "auto" else method, iterations=out.iterations,
        converged=out.converged, residuals=out.residuals.float().cpu(), passes=out.passes, vectors=out.vectors,
        fallback=out.fallback is not None,
    )


def _is_inference(model) -> bool:
    return any(p.is_inference() for p in model.unet.parameters())


def jacobian_directions(model, sample, step: int, k: int, mask=None, block: int | None = None,
                        tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, method: str = "auto",
                        init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        **kw: Any) -> JacobianDirections:
    """Top-k Jacobian directions of one sample at step index ``step`` (paper Sec. 4.2).

    sample: a seed or one sample's SampleOutput / dict (see :func:`sample_trajectory`); the
    Jacobian is taken at the sample's own x_t (its own step noise for eta > 0) and recorded h_t.
    mask: (H, W), (1, H, W) or (3, H, W) in [0, 1]: directions of ``mask * eps`` (a region).
    block: ``b`` selects Alg. 2 (``method="sequential"``) when method is "auto"; else the
    method's block size. init: (m, C, H, W) or (m, d) warm start. Extra keywords
    (``oversample``, ``products``, ``max_basis``) go to :func:`top_singular`.
    """
    step = _check_step(model, step)
    if block is not None and method == "auto":
        method = "sequential"
    latents, hs = sample_trajectory(model, sample)
    return directions_at(model, latents[step], hs[step], step, k, mask=mask, method=method, block=block,
                         tol=tol, max_iter=max_iter, init=init, generator=generator, **kw)


def jacobian_directions_all_steps(model, sample, k: int, *, steps: Sequence[int] | None = None, mask=None,
                                  method: str = "auto", block: int | None = None, tol: float = DEFAULT_TOL,
                                  max_iter: int = DEFAULT_MAX_ITER, warm_start: bool = True,
                                  align: bool = True, generator: torch.Generator | None = None,
                                  progress: bool = False, **kw: Any) -> JacobianDirections:
    """Top-k directions at every step (or ``steps``) of one sample, from one sampling pass.

    warm_start: start each step from the previous step's directions (neighbouring steps' subspaces
    overlap, so fewer iterations). align: flip each step's vectors to a non-negative dot product
    with the previous step's vector of the same index (the first step keeps the largest-component
    rule), so that "+" means the same across steps as far as the ordering persists.
    """
    steps = list(range(model.num_steps)) if steps is None else [_check_step(model, s) for s in steps]
    if not steps:
        raise InputError("steps is empty")
    if block is not None and method == "auto":
        method = "sequential"
    latents, hs = sample_trajectory(model, sample)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    results: list[JacobianDirections] = []
    prev = None
    for s in tqdm(steps, disable=not progress, desc="jacobian", leave=False):
        r = directions_at(model, latents[s], hs[s], s, k, mask=mask, method=method, block=block, tol=tol,
                          max_iter=max_iter, init=prev if warm_start else None, generator=generator, **kw)
        if align and results:
            flip = agreement_signs(r.directions.reshape(k, -1), results[-1].directions.reshape(k, -1))
            r.directions = r.directions * flip.reshape(k, *[1] * (r.directions.ndim - 1))
            r.left = r.left * flip.reshape(k, *[1] * (r.left.ndim - 1))
        results.append(r)
        prev = r.directions
    passes = {key: sum(r.passes.get(key, 0) for r in results) for key in results[0].passes}
    vectors = {key: sum(r.vectors.get(key, 0) for r in results) for key in results[0].vectors}
    return JacobianDirections(
        directions=torch.stack([r.directions for r in results]),
        singular_values=torch.stack([r.singular_values for r in results]),
        left=torch.stack([r.left for r in results]),
        steps=steps,
        iterations=torch.tensor([r.iterations for r in results]),
        converged=torch.tensor([r.converged for r in results]),
        residuals=torch.stack([r.residuals for r in results]),
        method=results[0].method, passes=passes, vectors=vectors,
        fallback=torch.tensor([r.fallback for r in results]),
    )


def global_at_index(V: torch.Tensor, S: torch.Tensor, tau: int, index: int | None = None) -> torch.Tensor:
    """The reference's "global at index" edit: direction ``index`` found at step ``tau``, applied
    at every step i scaled by step i's singular value of that index:

        delta[i] = S[i, index] * V[tau, index]

    V: (T, k, *h_shape); S: (T, k) -> (T, *h_shape), or (k, T, *h_shape) for all indices when
    ``index`` is None (one trajectory per direction, ready as ``delta_h`` with scale 1; the
    demo scales are 50-100 for unit singular values, smaller here as S already carries the scale).
    """
    if V.ndim < 4 or S.ndim != 2 or tuple(S.shape) != tuple(V.shape[:2]):
        raise InputError(f"V must be (T, k, *h_shape) and S (T, k); got {tuple(V.shape)} and {tuple(S.shape)}")
    T, k = S.shape
    if not -T <= tau < T:
        raise InputError(f"tau {tau} out of range 0..{T - 1}")
    per_h = (None,) * (V.ndim - 2)  # S broadcast over h's dimensions
    if index is None:
        return S.T[(..., *per_h)] * V[tau][:, None]
    if not -k <= index < k:
        raise InputError(f"index {index} out of range 0..{k - 1}")
    return S[(slice(None), index, *per_h)] * V[tau, index][None]
