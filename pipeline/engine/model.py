"""HSpaceModel: sample, record, edit and invert a diffusion model in h-space.

One class for every family (:mod:`pipeline.engine.families`: pixel ``UNet2DModel``s, latent
diffusion over a VQ or KL autoencoder, Stable Diffusion with prompts and classifier-free guidance)
and one denoising loop for every schedule (:mod:`pipeline.engine.schedules`: DDIM, flow matching).
Sampling runs in the denoiser's own space (x_t: pixels or latents); images are decoded at the end.
Edits are :class:`~pipeline.engine.edits.Edit` values, inversion is :mod:`pipeline.engine.inversion`.

Conventions used throughout the project (the paper's symbols in brackets):

- step index ``i`` runs in sampling order: ``i = 0`` is the first, noisiest step (timestep
  ``timesteps[0]``, e.g. 900 for T=10), ``i = T-1`` the last;
- ``h`` [h_t]: ``(B, T, *h_shape)``, the activation at the hook point at every step, recorded
  *before* any edit is added; h_shape is (C, H, W) at a U-Net's bottleneck, (N, C) in a transformer;
- ``Edit.delta`` [Delta h_t]: ``(T, *h_shape)`` (same edit for every sample) or ``(B, T, *h_shape)``;
- ``predict`` gives (P_t, eps_t) [eq. 3, the predicted x_0 and noise]; the step is eq. 2,
  x_{t-1} = a_{t-1} P_t + D_t (+ sigma_t z_t) with D_t from eps_t (:mod:`pipeline.engine.schedules.base`);
- images: ``(B, 3, H, W)`` float in [-1, 1]; x_t, x_T [x_T] and step noise [z_t]:
  ``(B, *latent_shape)`` (the image itself for pixel models).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from pipeline.cost import count
from pipeline.dtypes import autocast, weights_dtype
from pipeline.engine import noise as noise_streams
from pipeline.engine.edits import NO_EDIT, Edit, StepEdits, refuse_renamed, stacked_edit
from pipeline.engine.families import SETTINGS, Family, family_of, prompt_list
from pipeline.engine.hooks import HSpaceHook, check_h, resolve_hook
from pipeline.engine.inversion import InversionOutput, ddim_inversion, edit_friendly_inversion
from pipeline.engine.schedules import schedule_for, state_dtype
from pipeline.errors import ConfigError, InputError


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or the GPU when there is one (``model.device: null``)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class SampleOutput:
    """Result of :meth:`HSpaceModel.sample`.

    images: (B, 3, H, W) in [-1, 1]; h: (B, T, *h_shape) before edits; x_T: (B, *latent_shape);
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


class HSpaceModel:
    """A diffusers denoiser (with its autoencoder and text encoder, if any) with its sampler and
    read/write access to h-space.

    ``unet``: the denoising network, or a family adapter holding every network; ``autoencoder``
    makes it a latent model (``component``: its folder, ``vqvae`` or ``vae``), ``text_encoder`` and
    ``tokenizer`` a text-to-image one. ``eta``: 0 is DDIM, 1 DDPM-like, or a list of T values.
    ``hook``: "after" (mid-block output), "before" (mid-block input) or a dotted module path
    (``"up_blocks.0"``, ``"transformer_blocks.14"``); None: the family's default (``after`` for a U-Net,
    a middle block of a transformer: :attr:`Family.default_hook`). ``precision``: a ``trainer.precision``
    (``32-true`` default; ``*-true`` converts the weights, ``*-mixed`` autocasts the passes).
    ``condition``: the family's conditioning defaults (a text model's ``prompt``, ``negative_prompt``,
    ``guidance_scale``; SD3's and FLUX's also ``height``, ``width``, ``max_sequence_length``, fixed at build).
    """

    def __init__(self, unet, scheduler, num_inference_steps: int = 20, eta: float | Sequence[float] = 0.0,
                 hook: str | None = None, device: str | torch.device | None = None, precision=None,
                 name_or_path: str | None = None, *, autoencoder=None, component: str | None = None,
                 text_encoder=None, tokenizer=None, **condition):
        refuse_renamed(condition)
        self.family: Family = unet if isinstance(unet, Family) else family_of(unet, autoencoder, component,
                                                                                text_encoder, tokenizer)
        self.family.set_defaults(**condition)
        self.device = default_device(device)
        self.precision = "32-true" if precision is None else str(precision)
        weights = weights_dtype(self.precision)
        for module in self.family.modules().values():
            module.to(self.device).eval().requires_grad_(False)
            if any(p.dtype != weights for p in module.parameters() if p.is_floating_point()):
                module.to(dtype=weights)
        options = self.family.schedule_options(scheduler.config, int(num_inference_steps))
        self.schedule = schedule_for(scheduler, num_inference_steps, eta, **options)
        self.name_or_path = name_or_path
        self.hook_point = self.family.default_hook if hook is None else str(hook)
        module, before = resolve_hook(self.unet, self.hook_point)
        self.hook = HSpaceHook(module, before, self.family.hook_element(module), self.hook_point)
        try:
            self.h_shape: tuple[int, ...] = self._probe_h()
        except BaseException:
            self.hook.remove()  # the networks stay as they were
            raise

    @classmethod
    def from_pretrained(cls, name_or_path: str, num_inference_steps: int = 20, eta: float | Sequence[float] = 0.0,
                        hook: str | None = None, device: str | torch.device | None = None, precision=None,
                        **condition) -> HSpaceModel:
        """Load any family from an embedded name (``toyfaces``), a local ``save_pretrained`` folder, a
        hub id or the HF cache (``HF_HUB_OFFLINE=1``); the family comes from model_index.json
        (``DDPMPipeline``, ``LDMPipeline``, ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
        ``DiTPipeline``, ``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``, ``StableDiffusion3Pipeline``,
        ``FluxPipeline``) or the flat U-Net layout.
        ``condition``: a text model's ``prompt``, ``negative_prompt``, ``guidance_scale``; DiT's
        ``class_label``, ``guidance_scale``; SD3's and FLUX's ``height``, ``width`` (pixels) and
        ``max_sequence_length`` too."""
        from pipeline.engine.loading import load_pipeline

        refuse_renamed(condition)
        parts = load_pipeline(name_or_path, dtype=weights_dtype(precision))
        return cls(parts["family"], parts["scheduler"], num_inference_steps, eta, hook, device, precision,
                   name_or_path=str(name_or_path), **condition)

    @classmethod
    def from_config(cls, cfg, *, under_trainer: bool = False, precision=None) -> HSpaceModel:
        """The one builder of the pipeline: the model of a validated configuration (its ``model`` section
        at ``trainer.precision``, or ``precision`` where a stage computes in another one).

        under_trainer: a Lightning Trainer runs the model (generate, jacobian, evaluate): it is built on
        the CPU and Lightning moves it to each rank's device. The engine applies the precision itself
        either way (Lightning's own at the same setting then changes nothing), so that the networks
        Lightning does not see (the autoencoder, the text encoder) follow it too. The conditioning settings
        (``model.prompt``, ``class_label``, ``height``, ...) given are passed on; one the family does not take
        is refused in one line."""
        from pipeline.engine.loading import load_pipeline

        m = cfg.model
        precision = cfg.trainer.precision if precision is None else precision
        parts = load_pipeline(m.name_or_path, dtype=weights_dtype(precision))
        family, fields = parts["family"], type(m).model_fields
        given = {k: getattr(m, k) for k in SETTINGS if k in fields and getattr(m, k) != fields[k].default}
        if other := [k for k in given if k not in family.settings()]:
            takes = ", ".join(f"model.{k}" for k in family.settings()) or "no prompt, class or size setting"
            raise ConfigError(f"{', '.join(f'model.{k}={given[k]!r}' for k in other)}: {m.name_or_path} is a "
                              f"{family.kind} model, which takes {takes}; remove the setting")
        return cls(family, parts["scheduler"], m.num_inference_steps, m.eta, m.hook,
                   "cpu" if under_trainer else m.device, precision, name_or_path=str(m.name_or_path), **given)

    def _probe_h(self) -> tuple[int, ...]:
        """h_shape, from one pass of a batch of one; refuses a hook point whose output is not h."""
        calls = self.hook.calls
        with torch.no_grad():
            cond = self.family.conditioning(1) if self.family.conditional else None
            x = torch.zeros(1, *self.latent_shape, device=self.device, dtype=self.dtype)
            self.family.denoise(x, self.timesteps[0].to(self.device), cond, self.hook)
        if self.hook.calls == calls:
            raise InputError(f"model.hook={self.hook_point}: the network's pass never runs this "
                             f"{type(self.hook.module).__name__}; hook a block it runs")
        check_h(self.hook.h, self.hook_point, self.hook.module, 1)
        return tuple(self.hook.h.shape[1:])

    def to(self, device: str | torch.device) -> HSpaceModel:
        """Move the networks (and where noise is sent) to ``device``."""
        device = torch.device(device)
        if device != self.device:
            for module in self.family.modules().values():
                module.to(device)
            self.family.forget()
            self.device = device
        return self

    def _autocast(self):
        """Where sampling, inversion and denoiser passes run: ``*-mixed`` precisions autocast."""
        return autocast(self.precision, self.device.type)

    # ------------------------------------------------------------------ properties
    @property
    def unet(self) -> torch.nn.Module:
        """The denoising network (a U-Net here; a transformer in other families): where h is hooked."""
        return self.family.denoiser

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the networks compute in (their weights'); the denoiser's input follows it."""
        return next(self.unet.parameters()).dtype

    @property
    def num_steps(self) -> int:
        """T, the number of sampling steps."""
        return self.schedule.num_steps

    @property
    def timesteps(self) -> torch.Tensor:
        """(T,) the denoiser's time input at each step, in sampling order."""
        return self.schedule.timesteps

    @property
    def eta(self) -> torch.Tensor:
        """(T,) the default eta of each step."""
        return self.schedule.eta

    @property
    def scheduler(self):
        """The diffusers scheduler the schedule was built from."""
        return self.schedule.scheduler

    @property
    def kind(self) -> str:
        """The model family: ``pixel``, ``latent``, ``text`` (SD 1.x/2.x), ``sdxl``, ``dit``, ``pixart``, ``sd3``
        or ``flux``."""
        return self.family.kind

    @property
    def autoencoder(self):
        return getattr(self.family, "autoencoder", None)

    @property
    def text_encoder(self):
        return getattr(self.family, "text_encoder", None)

    @property
    def prompt(self) -> str | None:
        """A text model's default prompt (None for a model that takes no prompt)."""
        return self.family.defaults().get("prompt")

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of x_t per sample, where sampling runs ((C, H, W); the image itself for pixel models)."""
        return self.family.latent_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of the (decoded) images."""
        return self.family.image_shape

    def coefficients(self, eta: float | Sequence[float] | None = None):
        """Per-step scalars of the schedule (DDIM: alpha_t, alpha_prev, sigma_t) at ``eta`` (None: the model's)."""
        return self.schedule.coefficients(eta)

    def fingerprint(self) -> str:
        """A short hash of the networks' weights (:func:`~pipeline.engine.loading.weights_fingerprint`)."""
        from pipeline.engine.loading import weights_fingerprint

        return weights_fingerprint(self.family.modules())

    def describe(self) -> dict:
        """Provenance: what determines this model's samples."""
        return {
            "name_or_path": self.name_or_path, **self.schedule.describe(), "hook": self.hook_point,
            "h_shape": list(self.h_shape), "image_shape": list(self.image_shape),
            "dtype": str(self.dtype).replace("torch.", ""), "weights_fingerprint": self.fingerprint(),
            **({} if self.kind == "pixel" else {"family": self.kind, "latent_shape": list(self.latent_shape)}),
            **self.family.describe(),
        }

    # ------------------------------------------------------------------ noise and conditioning
    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T of each seed, (B, *latent_shape), from the seed's own stream."""
        return noise_streams.randn(seeds, "x_T", self.latent_shape)

    def step_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """z_t of each seed for every step, (B, T, *latent_shape), from the seed's own stream."""
        return noise_streams.randn(seeds, "z", (self.num_steps, *self.latent_shape))

    def conditioning(self, batch: int, **inputs):
        """The conditioning of a batch (None for unconditional models); inputs not given take the model's
        defaults. A text model's: ``prompt``, ``negative_prompt`` (one, or one per sample) and
        ``guidance_scale`` (guidance, a second unconditional branch, only for > 1)."""
        return self.family.conditioning(batch, **inputs)

    @contextlib.contextmanager
    def prompted(self, prompt: str | None):
        """Within the block, ``prompt`` is the default prompt (e.g. a stored sample's, for stages
        that regenerate it from its seed); None changes nothing."""
        with self.family.defaults_set(prompt=prompt):
            yield self

    # ------------------------------------------------------------------ the denoiser
    def predict(self, x_t: torch.Tensor, step: int, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_t, eps_t) at step index ``step`` from one (guided) pass of the denoiser, each computed from
        its native prediction (epsilon, v, sample or a flow velocity); the hook's current edit applies.
        ``cond``: the batch's conditioning (None: the model's defaults)."""
        with self._autocast():
            if self.family.conditional and cond is None:
                cond = self.conditioning(len(x_t))
            x_t = x_t.to(self.device).contiguous()  # conv kernels round differently for other memory layouts
            B = len(x_t)
            count(unet_evaluations=B * (1 if cond is None else cond.branches))  # the one count of denoiser work
            out = self.family.denoise(x_t.to(self.dtype), self.timesteps[step].to(self.device), cond, self.hook)
            state = state_dtype(self.device)
            return self.schedule.split_prediction(out.to(state), x_t.to(state), step)

    def eps(self, x_t: torch.Tensor, step: int, cond=None) -> torch.Tensor:
        """The (guided) noise prediction eps_t at step index ``step``; the hook's current edit applies."""
        return self.predict(x_t, step, cond)[1].float()

    def predict_given_h(self, x_t: torch.Tensor, step: int, h: torch.Tensor, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_t, eps_t) with the denoiser's h replaced by ``h`` (B, *h_shape); differentiable in h. Under
        guidance the unconditional branch's h moves by the same offset (as an edit does)."""
        with self.hook.editing(replace=h):
            return self.predict(x_t, step, cond)

    def eps_given_h(self, x_t: torch.Tensor, step: int, h: torch.Tensor, cond=None) -> torch.Tensor:
        """eps_t(x_t, h) (:meth:`predict_given_h`)."""
        return self.predict_given_h(x_t, step, h, cond)[1].float()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, seeds: Sequence[int] | None = None, edit: Edit | None = None, *, x_T: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, eta: float | Sequence[float] | None = None, start_step: int = 0,
               return_latents: bool = False, h_dtype: torch.dtype | None = None,
               h_device: str | torch.device | None = None, h_steps: Sequence[int] | None = None,
               progress: bool = False, **condition) -> SampleOutput:
        """Generate images while recording h, optionally editing it.

        seeds: one per sample; x_T and the step noise z_t come from each seed's own streams.
        edit: an :class:`~pipeline.engine.edits.Edit` (delta, replace, steps, asyrp, dx_T); None: none.
        x_T: (B, *latent_shape) start from given latents instead (e.g. an inversion's); with
            ``eta > 0`` also give ``noise`` (B, T, *latent_shape) or ``seeds`` for the step noise.
        eta: override the model's eta for this call.
        start_step: resume an earlier trajectory: ``x_T`` is the latent entering this step (that
            call's ``.latents[:, start_step]``) and the steps before it are not run; their h
            (and latents) are NaN. Unedited earlier steps make this equal to the whole run.
        return_latents: also return x_t entering every step, ``.latents`` (B, T, *latent_shape).
        h_dtype, h_device: where h is recorded (default: the model's dtype and device); e.g.
            float16 on the CPU streams a batch's trajectories straight into what a shard stores.
        h_steps: record h at these step indices only (sorted): ``.h`` is then (B, len(h_steps), *h_shape).
        condition: the family's conditioning inputs (text models: ``prompt``, ``negative_prompt``, one
            or one per sample, and ``guidance_scale``; see :mod:`pipeline.engine.families.text`).
        """
        refuse_renamed(condition)
        with self._autocast():
            # 1. noise from seeds: x_T (or the given latents) and the step noise z_t
            x_T, seeds = self._start(seeds, x_T, int(start_step))
            B = len(x_T)
            coef = self.coefficients(eta)
            z = self._step_noise(coef, B, seeds, noise)
            # 2. conditioning
            cond = self.conditioning(B, **condition)
            # 3. the edit schedule (checked once for the batch)
            edits = (edit or NO_EDIT).for_batch(B, self.num_steps, self.h_shape, self.latent_shape, self.device)
            x = x_T.to(self.device)
            if edits.dx_T is not None:
                x = x + edits.dx_T
            x_start = x.clone()
            # 4. the denoising loop
            recorded = range(self.num_steps) if h_steps is None else sorted(int(i) for i in h_steps)
            hs = torch.full((B, len(recorded), *self.h_shape), float("nan"), device=h_device or self.device,
                            dtype=h_dtype or self.dtype)
            latents = (torch.full((B, self.num_steps, *self.latent_shape), float("nan"), device=self.device,
                                  dtype=torch.float32) if return_latents else None)
            x_0 = self._denoise(x, int(start_step), cond, edits, coef, z, (hs, {i: k for k, i in enumerate(recorded)}),
                                latents, progress)
            # 5. decoding
            count(images=B)
            return SampleOutput(images=self.family.decode(x_0), h=hs, x_T=x_start, seeds=seeds, latents=latents,
                                x_0=x_0, prompts=getattr(cond, "prompts", None))

    def _denoise(self, x: torch.Tensor, first: int, cond, edits: StepEdits, coef, z, hs: tuple[torch.Tensor, dict],
                 latents: torch.Tensor | None, progress: bool) -> torch.Tensor:
        """Steps ``first``..T-1 from x (B, *latent_shape), writing x_t of each and h of the recorded ones (``hs``:
        the buffer and step -> its row); returns x_0 (float32)."""
        hs, rows = hs
        state = state_dtype(self.device)
        x = x.to(state)
        for i in tqdm(range(first, self.num_steps), disable=not progress, desc="sampling", leave=False):
            if latents is not None:
                latents[:, i] = x
            with edits.applied(self.hook, i):
                x0, eps = self.predict(x, i, cond)
            if i in rows:
                hs[:, rows[i]] = self.hook.h
            if edits.second_pass(i):
                eps = self.predict(x, i, cond)[1]  # D_t from an unedited pass, P_t from the edited one
            x = self.schedule.step(x0, eps, i, coef, None if z is None else z[:, i])
            x = x.float().to(state)  # x_t as stored in .latents: resuming from them is bit-identical
        return x.float()

    def _start(self, seeds, x_T, start_step: int) -> tuple[torch.Tensor, list[int] | None]:
        """x_T (B, *latent_shape) of the seeds, or the given latents checked; and the seeds as ints."""
        if not 0 <= start_step < self.num_steps:
            raise InputError(f"start_step {start_step} out of range 0..{self.num_steps - 1}")
        if start_step and x_T is None:
            raise InputError("start_step > 0 needs x_T: the latent entering that step")
        seeds = None if seeds is None else [int(s) for s in seeds]
        if x_T is None:
            if seeds is None:
                raise InputError("give seeds, or x_T (with noise or seeds when eta > 0)")
            x_T = self.initial_noise(seeds)
        else:
            x_T = torch.as_tensor(x_T, dtype=torch.float32)
            if x_T.ndim != 1 + len(self.latent_shape) or tuple(x_T.shape[1:]) != self.latent_shape:
                raise InputError(f"x_T has shape {tuple(x_T.shape)}; expected (B, {', '.join(map(str, self.latent_shape))})")
            if seeds is not None and len(seeds) != len(x_T):
                raise InputError(f"got {len(seeds)} seeds for {len(x_T)} latents")
        if len(x_T) == 0:
            raise InputError("nothing to sample: empty seeds / x_T")
        return x_T, seeds

    def _step_noise(self, coef, batch: int, seeds, noise) -> torch.Tensor | None:
        """z_t (B, T, *latent_shape) on the device where a step is stochastic: given, or from the seeds."""
        if not bool((coef.sigma > 0).any()):
            return None
        if noise is not None:
            z = torch.as_tensor(noise, dtype=torch.float32)
            if tuple(z.shape) != (batch, self.num_steps, *self.latent_shape):
                raise InputError(f"noise has shape {tuple(z.shape)}; expected {(batch, self.num_steps, *self.latent_shape)}")
        elif seeds is not None:
            z = self.step_noise(seeds)
        else:
            raise InputError("eta > 0 needs per-step noise: pass noise=(B, T, *latent_shape) or the samples' seeds")
        return z.to(self.device)

    def iter_edits(self, pairs: Sequence[tuple[int, torch.Tensor | None]], *, space: str = "h", batch_size: int = 64,
                   asyrp: bool = False, prompt: dict | None = None, progress: bool = False):
        """Sample (seed, edit) pairs ``batch_size`` at a time, yielding (indices into ``pairs``, images
        (b, 3, H, W) in [-1, 1] on the CPU) per batch: a caller that scores and drops each batch holds
        ``batch_size`` images, however many pairs there are. edit: (T, *h_shape) added to h
        (``space="h"``), (*latent_shape) added to x_T (``space="x_T"``), or None (the plain sample).
        prompt (text models): seed -> prompt. Each image depends only on its seed and its edit, not on
        the batch (up to the kernels' rounding)."""
        if space not in ("h", "x_T"):
            raise InputError(f"space must be 'h' or 'x_T', got {space!r}")
        shape = (self.num_steps, *self.h_shape) if space == "h" else self.latent_shape
        batch_size = max(1, int(batch_size))
        for start in tqdm(range(0, len(pairs), batch_size), disable=not progress, desc="edits", leave=False):
            idx = list(range(start, min(start + batch_size, len(pairs))))
            chunk = [pairs[i] for i in idx]
            edit = stacked_edit([e for _, e in chunk], shape, space, asyrp)
            condition = {} if prompt is None else {"prompt": [prompt[s] for s, _ in chunk]}
            yield idx, self.sample([int(s) for s, _ in chunk], edit, **condition).images.cpu()

    def sample_edits(self, seeds: Sequence[int], edits: Sequence[torch.Tensor | None], *, space: str = "h",
                     batch_size: int = 64, asyrp: bool = False, prompt: str | Sequence[str] | None = None,
                     progress: bool = False) -> torch.Tensor:
        """Images (E, S, 3, H, W) in [-1, 1]: every seed under every edit, ``batch_size`` images per call
        (:meth:`iter_edits` over every (edit, seed) pair: large batches, which a CPU needs to be busy).

        edits: E edits, each (T, *h_shape) added to h (``space="h"``) or (*latent_shape) added to x_T
        (``space="x_T"``); None is the plain sample. prompt (text models): one, or one per seed. Each
        image depends only on its seed and its edit, not on the batch."""
        seeds = [int(s) for s in seeds]
        if not seeds or not edits:
            raise InputError("sample_edits needs at least one seed and one edit")
        prompts = None if prompt is None else dict(zip(seeds, prompt_list(prompt, len(seeds))))
        pairs = [(s, e) for e in edits for s in seeds]
        images = torch.empty((len(edits), len(seeds), *self.image_shape), dtype=torch.float32)
        flat = images.view(len(pairs), *self.image_shape)
        for idx, out in self.iter_edits(pairs, space=space, batch_size=batch_size, asyrp=asyrp, prompt=prompts,
                                        progress=progress):
            flat[idx] = out
        return images

    # ------------------------------------------------------------------ inversion
    def encode_images(self, images) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> their x_0 (B, *latent_shape): encoded for latent models."""
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise InputError(f"images have shape {tuple(x.shape)}; expected (B, {', '.join(map(str, self.image_shape))})")
        if x.min() < -1.001 or x.max() > 1.001:
            raise InputError("images must be scaled to [-1, 1] (use pipeline.formats.images.from_uint8 for uint8 arrays)")
        return self.family.encode(x.to(self.device)).to(state_dtype(self.device))

    @torch.no_grad()
    def invert(self, images: torch.Tensor, fixed_point_iterations: int = 0, *, progress: bool = False,
               **condition) -> InversionOutput:
        """DDIM inversion (eta 0) of images (B, 3, H, W) in [-1, 1], recording h on the way
        (:func:`~pipeline.engine.inversion.ddim_inversion`).

        Latent models invert the encoded image; text models under the given conditioning (the model's
        defaults), which decoding must use too. ``sample(x_T=out.x_T, eta=0)`` decodes back to the
        images; ``fixed_point_iterations`` k > 0 makes it land much closer for k + 1 passes per step."""
        with self._autocast():
            x = self.encode_images(images)
            return ddim_inversion(self, x, self.conditioning(len(x), **condition), fixed_point_iterations, progress)

    @torch.no_grad()
    def invert_ddpm(self, images: torch.Tensor, seeds: Sequence[int], eta: float | Sequence[float] | None = None, *,
                    progress: bool = False, **condition) -> InversionOutput:
        """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2023) for eta > 0 (the model's by default).

        Every x_t is drawn independently around the image, x_t = sqrt(a_t) x0 + sqrt(1-a_t) n_t
        with n_t from each image's own seed (stream "inversion"; the original code left it
        unseeded), then the step noise z_t that makes each sampling step land exactly on the
        next x_t is solved for. ``sample(x_T=out.x_T, noise=out.noise)`` reproduces the images
        (exactly but for the last, deterministic step), and an edit of it reuses that noise.
        Returns x_T, noise (B, T, *latent_shape) and h recorded along the way."""
        with self._autocast():
            x0 = self.encode_images(images)
            return edit_friendly_inversion(self, x0, seeds, eta, self.conditioning(len(x0), **condition), progress)


__all__ = ["HSpaceModel", "SampleOutput", "InversionOutput", "Edit", "default_device"]
