"""HSpaceModel: sample, record, edit and invert an unconditional diffusion model in h-space.

Conventions used throughout the project:

- step index ``i`` runs in sampling order: ``i = 0`` is the first, noisiest step (timestep
  ``timesteps[0]``, e.g. 900 for T=10), ``i = T-1`` the last;
- ``h``: ``(B, T, C, H, W)``, the bottleneck activation at every step, recorded *before* any
  edit is added;
- ``delta_h``: ``(T, C, H, W)`` (same edit for every sample) or ``(B, T, C, H, W)``;
- images: ``(B, 3, H, W)`` float in [-1, 1].
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from diffusers import DDIMScheduler, UNet2DModel
from tqdm.auto import tqdm

from . import noise as noise_streams
from .dtypes import torch_dtype
from .errors import InputError
from .hooks import HOOK_POINTS, HSpaceHook
from .schedule import (
    PREDICTION_TYPES,
    ddim_coefficients,
    ddim_inversion_step,
    ddim_step,
    eta_schedule,
    output_to_eps,
    solve_step_noise,
)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or the GPU when there is one (``model.device: null``)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class SampleOutput:
    """Result of :meth:`HSpaceModel.sample`.

    images: (B, 3, H, W) in [-1, 1]; h: (B, T, C, H, W) before edits; x_T: (B, 3, H, W);
    seeds: the samples' seeds (None for samples given by their latents).
    """

    images: torch.Tensor
    h: torch.Tensor
    x_T: torch.Tensor
    seeds: list[int] | None
    latents: torch.Tensor | None = None  # (B, T, 3, H, W): x_t entering each step, if asked for


@dataclass
class InversionOutput:
    """Result of an inversion: x_T (B, 3, H, W) and h (B, T, C, H, W) recorded on the way."""

    x_T: torch.Tensor
    h: torch.Tensor
    noise: torch.Tensor | None = None  # (B, T, 3, H, W) step noise, from invert_ddpm


class HSpaceModel:
    """A diffusers ``UNet2DModel`` with a DDIM sampler and read/write access to h-space.

    ``eta``: 0 is DDIM, 1 DDPM-like, or a list of T values. ``hook``: "after" (mid-block
    output, default) or "before" (mid-block input).
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDIMScheduler,
        num_inference_steps: int = 20,
        eta: float | Sequence[float] = 0.0,
        hook: str = "after",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        name_or_path: str | None = None,
    ):
        if hook not in HOOK_POINTS:
            raise InputError(f"unknown hook point {hook!r}; choose one of {HOOK_POINTS}")
        if not hasattr(unet, "mid_block") or unet.mid_block is None:
            raise InputError("the U-Net has no mid_block, so it has no h-space bottleneck")
        if int(num_inference_steps) < 1 or num_inference_steps > scheduler.config.num_train_timesteps:
            raise InputError(
                f"num_inference_steps must be in 1..{scheduler.config.num_train_timesteps}, got {num_inference_steps}"
            )
        self.device = default_device(device)
        self.dtype = torch_dtype(dtype)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        if unet.dtype != self.dtype:
            self.unet.to(dtype=self.dtype)
        self.scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
        self.scheduler.set_timesteps(int(num_inference_steps))
        self.timesteps = self.scheduler.timesteps.clone().cpu()
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config; "
                             f"expected one of {PREDICTION_TYPES}")
        self.name_or_path = name_or_path
        self.hook_point = hook
        self.hook = HSpaceHook(self.unet.mid_block, hook)
        self.eta = eta_schedule(eta, self.num_steps)
        self._h_shape: tuple[int, ...] | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        num_inference_steps: int = 20,
        eta: float | Sequence[float] = 0.0,
        hook: str = "after",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> "HSpaceModel":
        """Load from an embedded name (``toyfaces``), a local ``save_pretrained`` folder, a hub id
        or the HF cache (``HF_HUB_OFFLINE=1``)."""
        from .loading import load_unet_and_scheduler

        unet, scheduler = load_unet_and_scheduler(name_or_path, dtype=torch_dtype(dtype))
        return cls(unet, scheduler, num_inference_steps, eta, hook, device, dtype, name_or_path=str(name_or_path))

    @classmethod
    def from_config(cls, model_cfg, device: str | torch.device | None = None) -> "HSpaceModel":
        """From the ``model`` section of conf.yaml; ``device`` overrides ``model.device``."""
        return cls.from_pretrained(
            model_cfg.name_or_path,
            num_inference_steps=model_cfg.num_inference_steps,
            eta=model_cfg.eta,
            hook=model_cfg.hook,
            device=device or model_cfg.device,
            dtype=model_cfg.dtype,
        )

    def to(self, device: str | torch.device) -> "HSpaceModel":
        """Move the U-Net (and where noise is sent) to ``device``."""
        device = torch.device(device)
        if device != self.device:
            self.unet.to(device)
            self.device = device
        return self

    # ------------------------------------------------------------------ properties
    @property
    def num_steps(self) -> int:
        """T, the number of sampling steps."""
        return len(self.timesteps)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    @property
    def h_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of h at the hook point (found with one tiny forward pass, then cached)."""
        if self._h_shape is None:
            with torch.no_grad():
                self.unet(torch.zeros(1, *self.image_shape, device=self.device, dtype=self.dtype), int(self.timesteps[0]))
            self._h_shape = tuple(self.hook.h.shape[1:])
        return self._h_shape

    def coefficients(self, eta: float | Sequence[float] | None = None):
        """Per-step DDIM scalars (alpha_t, alpha_prev, sigma_t) for this model's timesteps."""
        eta_t = self.eta if eta is None else eta_schedule(eta, self.num_steps)
        return ddim_coefficients(self.scheduler.alphas_cumprod, self.timesteps, float(self.scheduler.final_alpha_cumprod), eta_t)

    def fingerprint(self) -> str:
        """A short hash of the U-Net's weights (sums and squared sums of every tensor)."""
        import hashlib

        h = hashlib.sha256()
        with torch.no_grad():
            for name, p in sorted(self.unet.state_dict().items()):
                p = p.detach().double()
                h.update(f"{name}:{tuple(p.shape)}:{p.sum().item():.10e}:{p.square().sum().item():.10e}".encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """Provenance: what determines this model's samples."""
        return {
            "name_or_path": self.name_or_path,
            "scheduler": type(self.scheduler).__name__,
            "scheduler_config": dict(self.scheduler.config),
            "timesteps": self.timesteps.tolist(),
            "eta": self.eta.tolist(),
            "hook": self.hook_point,
            "h_shape": list(self.h_shape),
            "image_shape": list(self.image_shape),
            "dtype": str(self.dtype).replace("torch.", ""),
            "weights_fingerprint": self.fingerprint(),
        }

    # ------------------------------------------------------------------ noise
    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T of each seed, (B, 3, H, W), from the seed's own stream."""
        return noise_streams.randn(seeds, "x_T", self.image_shape)

    def step_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """z_t of each seed for every step, (B, T, 3, H, W), from the seed's own stream."""
        return noise_streams.randn(seeds, "z", (self.num_steps, *self.image_shape))

    # ------------------------------------------------------------------ the U-Net
    def eps(self, x_t: torch.Tensor, step: int) -> torch.Tensor:
        """Noise prediction eps_t at step index ``step`` (converted from v- or x0-prediction
        models); the hook's current edit applies."""
        t = self.timesteps[step].to(self.device)
        x_t = x_t.to(self.device).contiguous()  # conv kernels round differently for other memory layouts
        out = self.unet(x_t.to(self.dtype), t.expand(x_t.shape[0])).sample.float()
        return output_to_eps(out, x_t.float(), float(self.scheduler.alphas_cumprod[self.timesteps[step]]),
                             self.prediction_type)

    def eps_given_h(self, x_t: torch.Tensor, step: int, h: torch.Tensor) -> torch.Tensor:
        """eps_t(x_t, h): the U-Net with its h replaced by ``h`` (B, C, H, W); differentiable in h."""
        self.hook.replace, self.hook.delta = h, None
        try:
            return self.eps(x_t, step)
        finally:
            self.hook.clear()

    # ------------------------------------------------------------------ sampling
    def _per_sample(self, value: torch.Tensor | None, name: str, batch: int, trailing: tuple) -> torch.Tensor | None:
        """Check an edit tensor: (T, *trailing) shared by all, or (B, T, *trailing)."""
        if value is None:
            return None
        value = torch.as_tensor(value)
        T = self.num_steps
        if tuple(value.shape) == (T, *trailing):
            value = value.unsqueeze(0).expand(batch, *value.shape)
        elif tuple(value.shape) != (batch, T, *trailing):
            raise InputError(
                f"{name} has shape {tuple(value.shape)}; expected (T, C, H, W) = {(T, *trailing)} "
                f"or (B, T, C, H, W) = {(batch, T, *trailing)}"
            )
        return value.to(device=self.device, dtype=torch.float32)

    def _step_mask(self, steps: Iterable[int] | None) -> list[bool]:
        if steps is None:
            return [True] * self.num_steps
        steps = [int(s) for s in steps]
        bad = [s for s in steps if not 0 <= s < self.num_steps]
        if bad:
            raise InputError(f"steps {bad} out of range: step indices run 0..{self.num_steps - 1} (0 = first, noisiest)")
        return [i in set(steps) for i in range(self.num_steps)]

    @torch.no_grad()
    def sample(
        self,
        seeds: Sequence[int] | None = None,
        *,
        x_T: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        delta_h: torch.Tensor | None = None,
        replace_h: torch.Tensor | None = None,
        dx_T: torch.Tensor | None = None,
        steps: Iterable[int] | None = None,
        asyrp: bool = False,
        eta: float | Sequence[float] | None = None,
        return_latents: bool = False,
        start_step: int = 0,
        progress: bool = False,
    ) -> SampleOutput:
        """Generate images while recording h, optionally editing it.

        seeds: one per sample; x_T and the step noise z_t come from each seed's own streams.
        x_T: (B, 3, H, W) start from given latents instead (e.g. an inversion's); with
            ``eta > 0`` also give ``noise`` (B, T, 3, H, W) or ``seeds`` for the step noise.
        delta_h: (T, C, H, W) or (B, T, C, H, W), added to h (vector arithmetic, paper Sec. 3).
        replace_h: same shapes; h is replaced (the paper's Fig. 3 swap), before ``delta_h``.
        dx_T: (3, H, W) or (B, 3, H, W) offset added to x_T (the noise-space baseline, Fig. 8).
        steps: step indices where edits apply (default all).
        asyrp: drive D_t from a second, unedited pass (Asyrp) instead of the edited one.
        eta: override the model's eta for this call.
        return_latents: also return x_t entering every step, ``.latents`` (B, T, 3, H, W).
        start_step: resume an earlier trajectory: ``x_T`` is the latent entering this step (that
            call's ``.latents[:, start_step]``) and the steps before it are not run; their h
            (and latents) are NaN. Unedited earlier steps make this equal to the whole run.
        """
        start_step = int(start_step)
        if not 0 <= start_step < self.num_steps:
            raise InputError(f"start_step {start_step} out of range 0..{self.num_steps - 1}")
        if start_step and x_T is None:
            raise InputError("start_step > 0 needs x_T: the latent entering that step")
        if x_T is None:
            if seeds is None:
                raise InputError("give seeds, or x_T (with noise or seeds when eta > 0)")
            seeds = [int(s) for s in seeds]
            x_T = self.initial_noise(seeds)
        else:
            x_T = torch.as_tensor(x_T, dtype=torch.float32)
            if x_T.ndim != 4 or tuple(x_T.shape[1:]) != self.image_shape:
                raise InputError(f"x_T has shape {tuple(x_T.shape)}; expected (B, {', '.join(map(str, self.image_shape))})")
            if seeds is not None and len(seeds) != len(x_T):
                raise InputError(f"got {len(seeds)} seeds for {len(x_T)} latents")
        B = len(x_T)
        if B == 0:
            raise InputError("nothing to sample: empty seeds / x_T")
        coef = self.coefficients(eta)
        stochastic = bool((coef.sigma > 0).any())
        z = None
        if stochastic:
            if noise is not None:
                z = torch.as_tensor(noise, dtype=torch.float32)
                if tuple(z.shape) != (B, self.num_steps, *self.image_shape):
                    raise InputError(f"noise has shape {tuple(z.shape)}; expected {(B, self.num_steps, *self.image_shape)}")
            elif seeds is not None:
                z = self.step_noise(seeds)
            else:
                raise InputError("eta > 0 needs per-step noise: pass noise=(B, T, 3, H, W) or the samples' seeds")
            z = z.to(self.device)
        x = x_T.to(self.device)
        if dx_T is not None:
            dx_T = torch.as_tensor(dx_T, dtype=torch.float32)
            if tuple(dx_T.shape[-3:]) != self.image_shape or dx_T.ndim not in (3, 4):
                raise InputError(f"dx_T has shape {tuple(dx_T.shape)}; expected (3, H, W) or (B, 3, H, W)")
            x = x + dx_T.to(self.device)
        x_start = x.clone()
        h_shape = self.h_shape
        delta = self._per_sample(delta_h, "delta_h", B, h_shape)
        replace = self._per_sample(replace_h, "replace_h", B, h_shape)
        mask = self._step_mask(steps)
        hs = torch.full((B, self.num_steps, *h_shape), float("nan"), device=self.device, dtype=self.dtype)
        latents = (torch.full((B, self.num_steps, *self.image_shape), float("nan"), device=self.device)
                   if return_latents else None)

        for i in tqdm(range(start_step, self.num_steps), disable=not progress, desc="sampling", leave=False):
            if latents is not None:
                latents[:, i] = x
            edited = mask[i] and (delta is not None or replace is not None)
            if edited:
                self.hook.delta = None if delta is None else delta[:, i]
                self.hook.replace = None if replace is None else replace[:, i]
            try:
                eps = self.eps(x, i)
            finally:
                self.hook.clear()
            hs[:, i] = self.hook.h
            eps_direction = self.eps(x, i) if (asyrp and edited) else None
            x = ddim_step(
                x, eps, float(coef.alpha[i]), float(coef.alpha_prev[i]), float(coef.sigma[i]),
                None if z is None else z[:, i], eps_direction,
            )
        return SampleOutput(images=x.clamp(-1, 1), h=hs, x_T=x_start, seeds=None if seeds is None else list(seeds),
                            latents=latents)

    def sample_edits(self, seeds: Sequence[int], edits: Sequence[torch.Tensor | None], *, space: str = "h",
                     batch_size: int = 64, asyrp: bool = False, progress: bool = False) -> torch.Tensor:
        """Images (E, S, 3, H, W) in [-1, 1]: every seed under every edit, ``batch_size`` images per call.

        edits: E edits, each (T, C, H, W) added to h (``space="h"``) or (3, H, W) added to x_T
        (``space="x_T"``); None is the plain sample. The (edit, seed) pairs are sampled in large
        batches because a small one wastes most of a CPU's time (0.65 s per 32x32 toy image alone,
        0.2 s in batches of 64). Each image depends only on its seed and its edit, not on the batch."""
        if space not in ("h", "x_T"):
            raise InputError(f"space must be 'h' or 'x_T', got {space!r}")
        seeds = [int(s) for s in seeds]
        if not seeds or not edits:
            raise InputError("sample_edits needs at least one seed and one edit")
        pairs = [(e, s) for e in range(len(edits)) for s in range(len(seeds))]
        trailing = self.h_shape if space == "h" else self.image_shape
        images = torch.empty((len(edits), len(seeds), *self.image_shape))
        batch_size = max(1, int(batch_size))
        for start in tqdm(range(0, len(pairs), batch_size), disable=not progress, desc="edits", leave=False):
            chunk = pairs[start:start + batch_size]
            delta = None
            if any(edits[e] is not None for e, _ in chunk):
                shape = (self.num_steps, *trailing) if space == "h" else trailing
                delta = torch.stack([torch.zeros(shape) if edits[e] is None else
                                     torch.as_tensor(edits[e], dtype=torch.float32, device="cpu")
                                     for e, _ in chunk])
            kwargs = {"delta_h": delta, "asyrp": asyrp} if space == "h" else {"dx_T": delta}
            out = self.sample([seeds[s] for _, s in chunk], **kwargs).images.cpu()
            for (e, s), image in zip(chunk, out):
                images[e, s] = image
        return images

    # ------------------------------------------------------------------ inversion
    def _check_images(self, images) -> torch.Tensor:
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise InputError(f"images have shape {tuple(x.shape)}; expected (B, {', '.join(map(str, self.image_shape))})")
        if x.min() < -1.001 or x.max() > 1.001:
            raise InputError("images must be scaled to [-1, 1] (use pipeline.images.from_uint8 for uint8 arrays)")
        return x.to(self.device)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, fixed_point_iterations: int = 0, progress: bool = False) -> InversionOutput:
        """DDIM inversion (eta 0) of images (B, 3, H, W) in [-1, 1], recording h on the way.

        Runs the sampling steps backwards, from the clean image up to the first sampling
        timestep and no further, so that ``sample(x_T=out.x_T, eta=0)`` decodes back to the
        images. Plain DDIM inversion evaluates the U-Net for step i on the latent of step i+1
        (x_i is not known yet); ``fixed_point_iterations`` k > 0 then re-evaluates it k times on
        the current estimate of x_i and re-solves the step (a fixed-point iteration of
        x_i = inverse_step(x_{i+1}, eps(x_i)), as in AIDI / ReNoise), which makes decoding land
        much closer to the image for k + 1 U-Net passes per step. ``h[:, i]`` is recorded by the
        last pass of step i.
        """
        if int(fixed_point_iterations) < 0:
            raise InputError(f"fixed_point_iterations must be >= 0, got {fixed_point_iterations}")
        x = self._check_images(images)
        coef = self.coefficients(0.0)
        hs = torch.empty((len(x), self.num_steps, *self.h_shape), device=self.device, dtype=self.dtype)
        for i in tqdm(reversed(range(self.num_steps)), total=self.num_steps, disable=not progress, desc="inverting", leave=False):
            x_next, x_i = x, x
            for _ in range(int(fixed_point_iterations) + 1):
                eps = self.eps(x_i, i)
                x_i = ddim_inversion_step(x_next, eps, float(coef.alpha_prev[i]), float(coef.alpha[i]))
            hs[:, i] = self.hook.h
            x = x_i
        return InversionOutput(x_T=x, h=hs)

    @torch.no_grad()
    def invert_ddpm(self, images: torch.Tensor, seeds: Sequence[int], eta: float | Sequence[float] | None = None,
                    progress: bool = False) -> InversionOutput:
        """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2023) for eta > 0.

        Every x_t is drawn independently around the image, x_t = sqrt(a_t) x0 + sqrt(1-a_t) n_t
        with n_t from each image's own seed (stream "inversion"; the original code left it
        unseeded), then the step noise z_t that makes each sampling step land exactly on the
        next x_t is solved for (eta: the model's by default). ``sample(x_T=out.x_T, noise=out.noise)`` reproduces the
        images (exactly but for the last, deterministic step), and an edit of it reuses that
        noise. Returns x_T, noise (B, T, 3, H, W) and h recorded along the way.
        """
        x0 = self._check_images(images)
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(x0):
            raise InputError(f"got {len(seeds)} seeds for {len(x0)} images")
        coef = self.coefficients(eta)
        if (coef.sigma[:-1] <= 0).any():
            raise InputError("edit-friendly inversion needs eta > 0 at every step but the last")
        n = noise_streams.randn(seeds, "inversion", (self.num_steps, *self.image_shape)).to(self.device)
        a = coef.alpha.to(torch.float32).to(self.device).view(1, -1, 1, 1, 1)
        xs = a.sqrt() * x0[:, None] + (1 - a).sqrt() * n  # (B, T, 3, H, W): x_t entering every step
        z = torch.zeros_like(xs)
        hs = torch.empty((len(x0), self.num_steps, *self.h_shape), device=self.device, dtype=self.dtype)
        for i in tqdm(range(self.num_steps), disable=not progress, desc="inverting", leave=False):
            eps = self.eps(xs[:, i], i)
            hs[:, i] = self.hook.h
            if i < self.num_steps - 1:
                z[:, i] = solve_step_noise(xs[:, i + 1], xs[:, i], eps, float(coef.alpha[i]), float(coef.alpha_prev[i]),
                                     float(coef.sigma[i]))
        return InversionOutput(x_T=xs[:, 0], h=hs, noise=z)

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def counting_passes(self):
        """Context manager yielding a callable that returns the U-Net passes made inside it."""
        start = self.hook.calls
        yield lambda: self.hook.calls - start
