"""HSpaceModel: sample, record, edit and invert a diffusion model in h-space.

One class for every family (:mod:`pipeline.engine.families`): pixel ``UNet2DModel``s, latent diffusion
(a U-Net over a VQ or KL autoencoder's latents) and Stable Diffusion (text prompts and
classifier-free guidance). Sampling runs in the U-Net's own space (x_t: pixels or latents); images
are decoded at the end.

Conventions used throughout the project:

- step index ``i`` runs in sampling order: ``i = 0`` is the first, noisiest step (timestep
  ``timesteps[0]``, e.g. 900 for T=10), ``i = T-1`` the last;
- ``h``: ``(B, T, C, H, W)``, the bottleneck activation at every step, recorded *before* any
  edit is added;
- ``delta_h``: ``(T, C, H, W)`` (same edit for every sample) or ``(B, T, C, H, W)``;
- images: ``(B, 3, H, W)`` float in [-1, 1]; x_t, x_T and step noise: ``(B, *latent_shape)``
  (the image itself for pixel models).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from pipeline.cost import count
from pipeline.dtypes import precision_dtypes, torch_dtype
from pipeline.engine import noise as noise_streams
from pipeline.engine.families import LatentFamily, PixelFamily, TextFamily, prompt_list
from pipeline.engine.hooks import HSpaceHook, resolve_hook
from pipeline.engine.schedule import (
    PREDICTION_TYPES,
    ddim_coefficients,
    ddim_inversion_step,
    ddim_step,
    eta_schedule,
    solve_step_noise,
    split_prediction,
)
from pipeline.errors import InputError


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or the GPU when there is one (``model.device: null``)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def state_dtype(device: torch.device) -> torch.dtype:
    """The sampler's arithmetic within a step (P_t, D_t, x_{t-1}): float64, so that a step adds one
    float32 rounding (x_t is kept in float32 between steps, as ``.latents`` stores it) to the
    U-Net's; float32 where the device has no float64 (mps)."""
    return torch.float32 if device.type == "mps" else torch.float64


def in_precision_context(method):
    """Run an HSpaceModel method in the model's :meth:`~HSpaceModel.precision_context`."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.precision_context():
            return method(self, *args, **kwargs)
    return wrapper


def check_guidance(scale: float) -> float:
    scale = float(scale)
    if not (math.isfinite(scale) and scale >= 0):
        raise InputError(f"guidance_scale must be a finite number >= 0, got {scale}")
    return scale


@dataclass
class SampleOutput:
    """Result of :meth:`HSpaceModel.sample`.

    images: (B, 3, H, W) in [-1, 1]; h: (B, T, C, H, W) before edits; x_T: (B, *latent_shape);
    seeds: the samples' seeds (None for samples given by their latents); x_0: (B, *latent_shape)
    the final latent before decoding (the image itself for pixel models); prompts: text models'.
    """

    images: torch.Tensor
    h: torch.Tensor
    x_T: torch.Tensor
    seeds: list[int] | None
    latents: torch.Tensor | None = None  # (B, T, *latent_shape): x_t entering each step, if asked for
    x_0: torch.Tensor | None = None
    prompts: list[str] | None = None


@dataclass
class InversionOutput:
    """Result of an inversion: x_T (B, *latent_shape) and h (B, T, C, H, W) recorded on the way."""

    x_T: torch.Tensor
    h: torch.Tensor
    noise: torch.Tensor | None = None  # (B, T, *latent_shape) step noise, from invert_ddpm


@dataclass
class Conditioning:
    """Text embeddings of a batch: ``text`` (B, L, D) and, under classifier-free guidance
    (``scale`` > 1), ``uncond`` (B, L, D) of the negative prompts."""

    text: torch.Tensor
    uncond: torch.Tensor | None
    scale: float
    prompts: list[str]

    def expand(self, batch: int) -> "Conditioning":
        """One sample's conditioning repeated for a batch (a Jacobian's vectors)."""
        if len(self.text) == batch:
            return self
        grow = lambda t: None if t is None else t.expand(batch, *t.shape[1:])  # noqa: E731
        return Conditioning(grow(self.text), grow(self.uncond), self.scale, self.prompts * batch)


class HSpaceModel:
    """A diffusers U-Net (with its autoencoder and text encoder, if any) with a DDIM sampler and
    read/write access to h-space.

    ``eta``: 0 is DDIM, 1 DDPM-like, or a list of T values. ``hook``: "after" (mid-block
    output, default), "before" (mid-block input) or a dotted module path (``"up_blocks.0"``).
    ``autoencoder`` makes it a latent model (``component``: its folder, ``vqvae`` or ``vae``);
    ``text_encoder`` and ``tokenizer`` a text-to-image one, whose ``prompt``, ``negative_prompt``
    and ``guidance_scale`` are the defaults of :meth:`sample` and :meth:`invert`.
    """

    def __init__(
        self,
        unet,
        scheduler: DDIMScheduler,
        num_inference_steps: int = 20,
        eta: float | Sequence[float] = 0.0,
        hook: str = "after",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        name_or_path: str | None = None,
        *,
        autoencoder=None,
        component: str | None = None,
        text_encoder=None,
        tokenizer=None,
        prompt: str = "",
        negative_prompt: str = "",
        guidance_scale: float = 7.5,
    ):
        if int(num_inference_steps) < 1 or num_inference_steps > scheduler.config.num_train_timesteps:
            raise InputError(
                f"num_inference_steps must be in 1..{scheduler.config.num_train_timesteps}, got {num_inference_steps}"
            )
        conditional = getattr(unet.config, "cross_attention_dim", None) is not None
        if conditional and (text_encoder is None or tokenizer is None or autoencoder is None):
            raise InputError("a text-conditional U-Net needs its autoencoder, text_encoder and tokenizer")
        if text_encoder is not None and not conditional:
            raise InputError("a text encoder was given but the U-Net takes no text (no cross_attention_dim)")
        if conditional:
            self.family = TextFamily(unet, autoencoder, text_encoder, tokenizer)
        elif autoencoder is not None:
            self.family = LatentFamily(unet, autoencoder, component or "vqvae")
        else:
            self.family = PixelFamily(unet)
        self.device = default_device(device)
        self.dtype = torch_dtype(dtype)
        self.state_dtype = state_dtype(self.device)
        for module in self.family.modules().values():
            module.to(self.device).eval().requires_grad_(False)
            if module.dtype != self.dtype:
                module.to(dtype=self.dtype)
        self.unet = unet
        self.scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
        self.scheduler.set_timesteps(int(num_inference_steps))
        self.timesteps = self.scheduler.timesteps.clone().cpu()
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config; "
                             f"expected one of {PREDICTION_TYPES}")
        self.name_or_path = name_or_path
        self.hook_point = str(hook)
        self.hook = HSpaceHook(*resolve_hook(self.unet, self.hook_point))
        self.eta = eta_schedule(eta, self.num_steps)
        self.prompt, self.negative_prompt = str(prompt), str(negative_prompt)
        self.guidance_scale = check_guidance(guidance_scale)
        self._h_shape: tuple[int, ...] | None = None
        self._prompt_cache: tuple | None = None
        self.precision_dtypes: tuple = (None, None)  # (weights, autocast) of use_precision

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        num_inference_steps: int = 20,
        eta: float | Sequence[float] = 0.0,
        hook: str = "after",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **kwargs,
    ) -> "HSpaceModel":
        """Load any family from an embedded name (``toyfaces``), a local ``save_pretrained`` folder, a
        hub id or the HF cache (``HF_HUB_OFFLINE=1``); the family comes from model_index.json
        (``DDPMPipeline``, ``LDMPipeline``, ``StableDiffusionPipeline``) or the flat U-Net layout.
        ``kwargs``: ``prompt``, ``negative_prompt``, ``guidance_scale`` of a text model."""
        from pipeline.engine.loading import load_pipeline

        parts = load_pipeline(name_or_path, dtype=torch_dtype(dtype))
        extra = {k: parts[k] for k in ("autoencoder", "component", "text_encoder", "tokenizer") if k in parts}
        return cls(parts["unet"], parts["scheduler"], num_inference_steps, eta, hook, device, dtype,
                   name_or_path=str(name_or_path), **extra, **kwargs)

    @classmethod
    def from_config(cls, model_cfg, device: str | torch.device | None = None, precision=None) -> "HSpaceModel":
        """From the ``model`` section of conf.yaml; ``device`` overrides ``model.device``; ``precision``
        (``trainer.precision``) for the stages that run without a Lightning Trainer (see :meth:`use_precision`)."""
        text = {k: getattr(model_cfg, k) for k in ("prompt", "negative_prompt", "guidance_scale")
                if getattr(model_cfg, k, None) is not None}
        return cls.from_pretrained(
            model_cfg.name_or_path,
            num_inference_steps=model_cfg.num_inference_steps,
            eta=model_cfg.eta,
            hook=model_cfg.hook,
            device=device or model_cfg.device,
            dtype=model_cfg.dtype,
            **text,
        ).use_precision(precision)

    def use_precision(self, precision=None) -> "HSpaceModel":
        """Compute as a Lightning Trainer at ``precision`` (``trainer.precision``) would, without one:
        ``*-true`` converts the networks' weights (and makes their dtype the default one while the model
        works), ``*-mixed`` autocasts. None or 32-true: as loaded. Stages under a Trainer leave it to Lightning."""
        self.precision_dtypes = precision_dtypes(precision, self.device.type) if precision is not None else (None, None)
        weights = self.precision_dtypes[0]
        if weights is not None and weights != self.dtype:
            for module in self.family.modules().values():
                module.to(dtype=weights)
            self.dtype = weights
        return self

    @contextlib.contextmanager
    def precision_context(self):
        """Where sampling, inversion and U-Net passes run: :meth:`use_precision`'s autocast or default dtype."""
        weights, autocast = self.precision_dtypes
        if autocast is not None:
            with torch.autocast(self.device.type, dtype=autocast):
                yield
        elif weights is not None:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(weights)
            try:
                yield
            finally:
                torch.set_default_dtype(previous)
        else:
            yield

    def to(self, device: str | torch.device) -> "HSpaceModel":
        """Move the networks (and where noise is sent) to ``device``."""
        device = torch.device(device)
        if device != self.device:
            for module in self.family.modules().values():
                module.to(device)
            self._prompt_cache = None
            self.device = device
            self.state_dtype = state_dtype(device)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def num_steps(self) -> int:
        """T, the number of sampling steps."""
        return len(self.timesteps)

    @property
    def kind(self) -> str:
        """The model family: ``pixel``, ``latent`` or ``text``."""
        return self.family.kind

    @property
    def autoencoder(self):
        return getattr(self.family, "autoencoder", None)

    @property
    def text_encoder(self):
        return getattr(self.family, "text_encoder", None)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x_t, where sampling runs (the image itself for pixel models)."""
        return self.family.latent_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of the (decoded) images."""
        return self.family.image_shape

    @property
    def unet_dtype(self) -> torch.dtype:
        """The dtype the U-Net computes in: ``model.dtype``, or what a Lightning ``*-true`` precision
        (``trainer.precision=bf16-true``) converted its weights to; the U-Net's input follows it."""
        return next(self.unet.parameters()).dtype

    @property
    def h_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of h at the hook point (found with one tiny forward pass, then cached)."""
        if self._h_shape is None:
            with torch.no_grad():
                cond = self.conditioning(1, guidance_scale=1.0) if self.family.conditional else None
                x = torch.zeros(1, *self.latent_shape, device=self.device, dtype=self.unet_dtype)
                self.family.unet_output(x, self.timesteps[:1].to(self.device), None if cond is None else cond.text)
            shape = tuple(self.hook.h.shape[1:])
            if len(shape) != 3:  # directions files and the samples' h are (T, C, H, W) per sample
                raise InputError(f"h at model.hook={self.hook_point} has shape {shape} per sample, not (C, H, W); hook a "
                                 f"U-Net block whose output is a feature map (after, before, up_blocks.0, ...)")
            self._h_shape = shape
        return self._h_shape

    def conditioning(self, batch: int, prompt: str | Sequence[str] | None = None,
                     negative_prompt: str | Sequence[str] | None = None,
                     guidance_scale: float | None = None) -> Conditioning | None:
        """The text conditioning of a batch (None for unconditional models); None arguments take the
        model's defaults. Guidance (a second, unconditional branch) only for ``guidance_scale`` > 1."""
        if not self.family.conditional:
            if prompt is not None or negative_prompt is not None or guidance_scale is not None:
                raise InputError(f"prompt, negative_prompt and guidance_scale apply to text-to-image models; "
                                 f"{self.name_or_path or 'this model'} is a {self.kind} model")
            return None
        scale = self.guidance_scale if guidance_scale is None else check_guidance(guidance_scale)
        prompts = prompt_list(self.prompt if prompt is None else prompt, batch)
        text = self._embed(prompts)
        uncond = None
        if scale > 1:
            negative = prompt_list(self.negative_prompt if negative_prompt is None else negative_prompt, batch,
                                   "negative_prompt")
            uncond = self._embed(negative)
        return Conditioning(text, uncond, scale, prompts)

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings of prompts, the distinct ones encoded once (and the last set cached)."""
        key = tuple(prompts)
        if self._prompt_cache is not None and self._prompt_cache[0] == key:
            return self._prompt_cache[1]
        unique = list(dict.fromkeys(prompts))
        emb = self.family.encode_prompts(unique)
        out = emb[[unique.index(p) for p in prompts]]
        self._prompt_cache = (key, out)
        return out

    def coefficients(self, eta: float | Sequence[float] | None = None):
        """Per-step DDIM scalars (alpha_t, alpha_prev, sigma_t) for this model's timesteps."""
        eta_t = self.eta if eta is None else eta_schedule(eta, self.num_steps)
        return ddim_coefficients(self.scheduler.alphas_cumprod, self.timesteps, float(self.scheduler.final_alpha_cumprod), eta_t)

    def fingerprint(self) -> str:
        """A short hash of the networks' weights (sums and squared sums of every tensor)."""
        import hashlib

        h = hashlib.sha256()
        state = {f"{c}.{k}" if c != "unet" else k: v for c, m in self.family.modules().items()
                 for k, v in m.state_dict().items()}
        with torch.no_grad():
            for name, p in sorted(state.items()):
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
            **({} if self.kind == "pixel" else {"family": self.kind, "latent_shape": list(self.latent_shape)}),
            **({"guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt}
               if self.kind == "text" else {}),
        }

    # ------------------------------------------------------------------ noise
    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T of each seed, (B, *latent_shape), from the seed's own stream."""
        return noise_streams.randn(seeds, "x_T", self.latent_shape)

    def step_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """z_t of each seed for every step, (B, T, *latent_shape), from the seed's own stream."""
        return noise_streams.randn(seeds, "z", (self.num_steps, *self.latent_shape))

    # ------------------------------------------------------------------ the U-Net
    def _alpha(self, step: int) -> float:
        return float(self.scheduler.alphas_cumprod[self.timesteps[step]].double())

    @in_precision_context
    def predict(self, x_t: torch.Tensor, step: int, cond: Conditioning | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_t, eps_t) at step index ``step`` from one U-Net pass, each computed from the model's
        native prediction (epsilon, v or sample); the hook's current edit applies.

        Text models: ``cond`` (None: the model's default prompt); under guidance the pass runs on
        ``[uncond; cond]`` and the native predictions are combined as diffusers does."""
        if self.family.conditional and cond is None:
            cond = self.conditioning(len(x_t))
        x_t = x_t.to(self.device).contiguous()  # conv kernels round differently for other memory layouts
        B = len(x_t)
        x_in = x_t.to(self.unet_dtype)
        t = self.timesteps[step].to(self.device)
        count(unet_evaluations=B if cond is None or cond.uncond is None else 2 * B)  # the one count of U-Net work
        if cond is None:
            out = self.family.unet_output(x_in, t.expand(B))
        elif cond.uncond is None:
            out = self.family.unet_output(x_in, t.expand(B), cond.expand(B).text)
        else:
            cond = cond.expand(B)
            self.hook.first_row = B  # h of the conditional half; edits move both halves
            try:
                both = self.family.unet_output(torch.cat([x_in, x_in]), t.expand(2 * B), torch.cat([cond.uncond, cond.text]))
            finally:
                self.hook.first_row = 0
            uncond, text = both.chunk(2)
            out = uncond + cond.scale * (text - uncond)
        return split_prediction(out.to(self.state_dtype), x_t.to(self.state_dtype), self._alpha(step), self.prediction_type)

    def eps(self, x_t: torch.Tensor, step: int, cond: Conditioning | None = None) -> torch.Tensor:
        """(Guided) noise prediction eps_t at step index ``step`` (converted from v- or
        x0-prediction models); the hook's current edit applies."""
        return self.predict(x_t, step, cond)[1].float()

    def eps_given_h(self, x_t: torch.Tensor, step: int, h: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        """eps_t(x_t, h): the U-Net with its h replaced by ``h`` (B, C, H, W); differentiable in h.
        Under guidance the unconditional branch's h moves by the same offset (as an edit does)."""
        self.hook.replace, self.hook.delta = h, None
        try:
            return self.eps(x_t, step, cond)
        finally:
            self.hook.clear()

    @contextlib.contextmanager
    def prompted(self, prompt: str | None):
        """Within the block, ``prompt`` is the default prompt (e.g. a stored sample's, for stages
        that regenerate it from its seed); None changes nothing."""
        old = self.prompt
        if prompt is not None:
            self.prompt = str(prompt)
        try:
            yield self
        finally:
            self.prompt = old

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

    @in_precision_context
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
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance_scale: float | None = None,
        return_latents: bool = False,
        h_dtype: torch.dtype | None = None,
        h_device: str | torch.device | None = None,
        start_step: int = 0,
        progress: bool = False,
    ) -> SampleOutput:
        """Generate images while recording h, optionally editing it.

        seeds: one per sample; x_T and the step noise z_t come from each seed's own streams.
        x_T: (B, *latent_shape) start from given latents instead (e.g. an inversion's); with
            ``eta > 0`` also give ``noise`` (B, T, *latent_shape) or ``seeds`` for the step noise.
        delta_h: (T, C, H, W) or (B, T, C, H, W), added to h (vector arithmetic, paper Sec. 3).
        replace_h: same shapes; h is replaced (the paper's Fig. 3 swap), before ``delta_h``.
        dx_T: (3, H, W) or (B, 3, H, W) offset added to x_T (the noise-space baseline, Fig. 8).
        steps: step indices where edits apply (default all).
        asyrp: drive D_t from a second, unedited pass (Asyrp) instead of the edited one.
        eta: override the model's eta for this call.
        prompt, negative_prompt: text models only; one string or one per sample (default: the
            model's). guidance_scale: > 1 is classifier-free guidance, h from the conditional
            branch, edits in both (see :mod:`pipeline.engine.families`); 1 is one conditional pass.
        return_latents: also return x_t entering every step, ``.latents`` (B, T, *latent_shape).
        h_dtype, h_device: where h is recorded (default: the model's dtype and device); e.g.
            float16 on the CPU streams a batch's trajectories straight into what a shard stores.
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
            if x_T.ndim != 4 or tuple(x_T.shape[1:]) != self.latent_shape:
                raise InputError(f"x_T has shape {tuple(x_T.shape)}; expected (B, {', '.join(map(str, self.latent_shape))})")
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
                if tuple(z.shape) != (B, self.num_steps, *self.latent_shape):
                    raise InputError(f"noise has shape {tuple(z.shape)}; expected {(B, self.num_steps, *self.latent_shape)}")
            elif seeds is not None:
                z = self.step_noise(seeds)
            else:
                raise InputError("eta > 0 needs per-step noise: pass noise=(B, T, *latent_shape) or the samples' seeds")
            z = z.to(self.device)
        x = x_T.to(self.device)
        if dx_T is not None:
            dx_T = torch.as_tensor(dx_T, dtype=torch.float32)
            if tuple(dx_T.shape[-3:]) != self.latent_shape or dx_T.ndim not in (3, 4):
                raise InputError(f"dx_T has shape {tuple(dx_T.shape)}; expected {self.latent_shape} or (B, *{self.latent_shape})")
            x = x + dx_T.to(self.device)
        x_start = x.clone()
        x = x.to(self.state_dtype)
        cond = self.conditioning(B, prompt, negative_prompt, guidance_scale)
        h_shape = self.h_shape
        delta = self._per_sample(delta_h, "delta_h", B, h_shape)
        replace = self._per_sample(replace_h, "replace_h", B, h_shape)
        mask = self._step_mask(steps)
        hs = torch.full((B, self.num_steps, *h_shape), float("nan"), device=h_device or self.device,
                        dtype=h_dtype or self.dtype)
        latents = (torch.full((B, self.num_steps, *self.latent_shape), float("nan"), device=self.device)
                   if return_latents else None)

        for i in tqdm(range(start_step, self.num_steps), disable=not progress, desc="sampling", leave=False):
            if latents is not None:
                latents[:, i] = x
            edited = mask[i] and (delta is not None or replace is not None)
            if edited:
                self.hook.delta = None if delta is None else delta[:, i]
                self.hook.replace = None if replace is None else replace[:, i]
            try:
                x0, eps = self.predict(x, i, cond)
            finally:
                self.hook.clear()
            hs[:, i] = self.hook.h
            if asyrp and edited:
                eps = self.predict(x, i, cond)[1]  # D_t from an unedited pass, P_t from the edited one
            x = ddim_step(x0, eps, float(coef.alpha_prev[i]), float(coef.sigma[i]), None if z is None else z[:, i])
            x = x.float().to(self.state_dtype)  # x_t as stored in .latents: resuming from them is bit-identical
        x_0 = x.float()
        count(images=B)
        return SampleOutput(images=self.family.decode(x_0), h=hs, x_T=x_start, seeds=None if seeds is None else list(seeds),
                            latents=latents, x_0=x_0, prompts=None if cond is None else cond.prompts)

    def iter_edits(self, pairs: Sequence[tuple[int, torch.Tensor | None]], *, space: str = "h", batch_size: int = 64,
                   asyrp: bool = False, prompt: dict | None = None, progress: bool = False):
        """Sample (seed, edit) pairs ``batch_size`` at a time, yielding (indices into ``pairs``, images
        (b, 3, H, W) in [-1, 1] on the CPU) per batch: a caller that scores and drops each batch holds
        ``batch_size`` images, however many pairs there are. edit: (T, C, H, W) added to h
        (``space="h"``), (*latent_shape) added to x_T (``space="x_T"``), or None (the plain sample).
        prompt (text models): seed -> prompt. Each image depends only on its seed and its edit, not on
        the batch (up to the kernels' rounding)."""
        if space not in ("h", "x_T"):
            raise InputError(f"space must be 'h' or 'x_T', got {space!r}")
        trailing = self.h_shape if space == "h" else self.latent_shape
        shape = (self.num_steps, *trailing) if space == "h" else trailing
        batch_size = max(1, int(batch_size))
        for start in tqdm(range(0, len(pairs), batch_size), disable=not progress, desc="edits", leave=False):
            idx = list(range(start, min(start + batch_size, len(pairs))))
            chunk = [pairs[i] for i in idx]
            delta = None
            if any(e is not None for _, e in chunk):
                delta = torch.stack([torch.zeros(shape) if e is None else torch.as_tensor(e, dtype=torch.float32,
                                                                                           device="cpu")
                                     for _, e in chunk])
            kwargs = {"delta_h": delta, "asyrp": asyrp} if space == "h" else {"dx_T": delta}
            if prompt is not None:
                kwargs["prompt"] = [prompt[s] for s, _ in chunk]
            yield idx, self.sample([int(s) for s, _ in chunk], **kwargs).images.cpu()

    def sample_edits(self, seeds: Sequence[int], edits: Sequence[torch.Tensor | None], *, space: str = "h",
                     batch_size: int = 64, asyrp: bool = False, prompt: str | Sequence[str] | None = None,
                     progress: bool = False) -> torch.Tensor:
        """Images (E, S, 3, H, W) in [-1, 1]: every seed under every edit, ``batch_size`` images per call
        (:meth:`iter_edits` over every (edit, seed) pair).

        edits: E edits, each (T, C, H, W) added to h (``space="h"``) or (*latent_shape) added to x_T
        (``space="x_T"``); None is the plain sample. prompt (text models): one, or one per seed. The
        (edit, seed) pairs are sampled in large batches because a small one wastes most of a CPU's
        time (0.65 s per 32x32 toy image alone, 0.2 s in batches of 64). Each image depends only on
        its seed and its edit, not on the batch."""
        seeds = [int(s) for s in seeds]
        if not seeds or not edits:
            raise InputError("sample_edits needs at least one seed and one edit")
        prompts = None if prompt is None else dict(zip(seeds, prompt_list(prompt, len(seeds))))
        pairs = [(s, e) for e in edits for s in seeds]
        images = torch.empty((len(edits), len(seeds), *self.image_shape))
        flat = images.view(len(pairs), *self.image_shape)
        for idx, out in self.iter_edits(pairs, space=space, batch_size=batch_size, asyrp=asyrp, prompt=prompts,
                                        progress=progress):
            flat[idx] = out
        return images

    # ------------------------------------------------------------------ inversion
    def _check_images(self, images) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> their x_0 (B, *latent_shape): encoded for latent models."""
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise InputError(f"images have shape {tuple(x.shape)}; expected (B, {', '.join(map(str, self.image_shape))})")
        if x.min() < -1.001 or x.max() > 1.001:
            raise InputError("images must be scaled to [-1, 1] (use pipeline.formats.images.from_uint8 for uint8 arrays)")
        return self.family.encode(x.to(self.device)).to(self.state_dtype)

    @in_precision_context
    @torch.no_grad()
    def invert(self, images: torch.Tensor, fixed_point_iterations: int = 0, *, prompt: str | Sequence[str] | None = None,
               negative_prompt: str | Sequence[str] | None = None, guidance_scale: float | None = None,
               progress: bool = False) -> InversionOutput:
        """DDIM inversion (eta 0) of images (B, 3, H, W) in [-1, 1], recording h on the way.

        Latent models invert the encoded image (the autoencoder's latent); text models under the
        given prompt and guidance (the model's defaults), which decoding must use too.

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
        cond = self.conditioning(len(x), prompt, negative_prompt, guidance_scale)
        coef = self.coefficients(0.0)
        hs = torch.empty((len(x), self.num_steps, *self.h_shape), device=self.device, dtype=self.dtype)
        for i in tqdm(reversed(range(self.num_steps)), total=self.num_steps, disable=not progress, desc="inverting", leave=False):
            x_next, x_i = x, x
            for _ in range(int(fixed_point_iterations) + 1):
                eps = self.predict(x_i, i, cond)[1]
                x_i = ddim_inversion_step(x_next, eps, float(coef.alpha_prev[i]), float(coef.alpha[i]))
            hs[:, i] = self.hook.h
            x = x_i
        return InversionOutput(x_T=x.float(), h=hs)

    @in_precision_context
    @torch.no_grad()
    def invert_ddpm(self, images: torch.Tensor, seeds: Sequence[int], eta: float | Sequence[float] | None = None, *,
                    prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                    guidance_scale: float | None = None, progress: bool = False) -> InversionOutput:
        """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2023) for eta > 0.

        Every x_t is drawn independently around the image, x_t = sqrt(a_t) x0 + sqrt(1-a_t) n_t
        with n_t from each image's own seed (stream "inversion"; the original code left it
        unseeded), then the step noise z_t that makes each sampling step land exactly on the
        next x_t is solved for (eta: the model's by default). ``sample(x_T=out.x_T, noise=out.noise)`` reproduces the
        images (exactly but for the last, deterministic step), and an edit of it reuses that
        noise. Returns x_T, noise (B, T, *latent_shape) and h recorded along the way.
        """
        x0 = self._check_images(images)
        cond = self.conditioning(len(x0), prompt, negative_prompt, guidance_scale)
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(x0):
            raise InputError(f"got {len(seeds)} seeds for {len(x0)} images")
        coef = self.coefficients(eta)
        if (coef.sigma[:-1] <= 0).any():
            raise InputError("edit-friendly inversion needs eta > 0 at every step but the last")
        n = noise_streams.randn(seeds, "inversion", (self.num_steps, *self.latent_shape)).to(self.device)
        a = coef.alpha.to(torch.float32).to(self.device).view(1, -1, 1, 1, 1)
        xs = a.sqrt() * x0.float()[:, None] + (1 - a).sqrt() * n  # (B, T, *latent_shape): x_t entering every step
        z = torch.zeros_like(xs)
        hs = torch.empty((len(x0), self.num_steps, *self.h_shape), device=self.device, dtype=self.dtype)
        for i in tqdm(range(self.num_steps), disable=not progress, desc="inverting", leave=False):
            p0, eps = self.predict(xs[:, i], i, cond)
            hs[:, i] = self.hook.h
            if i < self.num_steps - 1:
                z[:, i] = solve_step_noise(xs[:, i + 1], p0, eps, float(coef.alpha_prev[i]), float(coef.sigma[i]))
        return InversionOutput(x_T=xs[:, 0], h=hs, noise=z)

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def counting_passes(self):
        """Context manager yielding a callable that returns the U-Net passes made inside it."""
        start = self.hook.calls
        yield lambda: self.hook.calls - start
