"""`hspace train-toy`: train the embedded default DDPM on freshly rendered toy faces.

Every batch is a pure function of (seed, step): the factors, the faces, the diffusion noise
and the timesteps all come from generators seeded with both. Training is therefore
reproducible from the seed and resumes exactly from its last checkpoint, even across
machines or sessions. The result is saved with ``save_pretrained`` in the flat layout of the
hub DDPM repositories (``config.json``, ``diffusion_pytorch_model.safetensors``,
``scheduler_config.json``, ``model_index.json``), so ``HSpaceModel.from_pretrained`` loads it
like ``google/ddpm-ema-celebahq-256``.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from pipeline.config import ToyTrainConfig, to_dict
from pipeline.formats.images import from_uint8
from pipeline.io import atomic_path
from toyfaces.render import RESOLUTION, render_faces, sample_factors


def build_unet(cfg: ToyTrainConfig) -> UNet2DModel:
    """The toy U-Net: attention only in the mid block, whose output is h (C=128, 8x8)."""
    n = len(cfg.block_out_channels)
    return UNet2DModel(
        sample_size=RESOLUTION,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
    )


def build_scheduler(cfg: ToyTrainConfig) -> DDPMScheduler:
    """1000 training steps. The default is v-prediction on the cosine schedule, sampled with
    "trailing" timesteps (the first sampling step at t=999): at 32x32 with large flat colour
    areas, eps-prediction on the linear schedule leaks the images' mean colour into x_T and an
    undertrained model then saturates colours (Lin et al. 2023, "Common diffusion noise
    schedules and sample steps are flawed"). The engine converts any prediction type to eps."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, clip_sample=False,
                         prediction_type=cfg.prediction_type, timestep_spacing=cfg.timestep_spacing)


def training_batch(cfg: ToyTrainConfig, step: int) -> torch.Tensor:
    """The faces of one step, (B, 3, 32, 32) in [-1, 1]; a pure function of (seed, step)."""
    factors = sample_factors(cfg.batch_size, np.random.SeedSequence([cfg.seed, 1, step]), cfg.correlations)
    return from_uint8(render_faces(factors))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def initial_unet(cfg: ToyTrainConfig, init_from: str | None) -> UNet2DModel:
    """Random weights from the seed, or (``init_from``, an exported model directory) that
    model's weights in float32, which must have the configured architecture."""
    torch.manual_seed(cfg.seed)  # initial weights only; batches have their own generators
    unet = build_unet(cfg)
    if init_from is None:
        return unet
    from pipeline.errors import ConfigError

    src = Path(init_from)
    if not (src / "config.json").is_file():
        raise ConfigError(f"init_from={init_from!r}: no exported model there (config.json missing); "
                          "run the phase it starts from first (hspace train-toy) or point it at a model directory")
    loaded = UNet2DModel.from_pretrained(src, torch_dtype=torch.float32)
    try:
        unet.load_state_dict(loaded.state_dict())
    except RuntimeError as e:
        raise ConfigError(f"init_from={init_from!r} has another architecture than block_out_channels="
                          f"{list(cfg.block_out_channels)}, layers_per_block={cfg.layers_per_block}: {str(e)[:200]}") from None
    return unet


class SkipDropout:
    """Forward hooks on the U-Net's down blocks that multiply their skip outputs by a
    per-sample mask, (B,) of 1 (keep) or 0 (drop), while one is set: for a dropped sample the
    decoder sees no down-block skip (conv_in's stays) and must draw the face from h.
    ``mask=None`` leaves the U-Net as is."""

    def __init__(self, unet: UNet2DModel):
        self.mask: torch.Tensor | None = None
        self.handles = [b.register_forward_hook(self._hook) for b in unet.down_blocks]

    def _hook(self, module, inputs, output):
        if self.mask is None:
            return output
        hidden, skips = output
        m = self.mask.view(-1, 1, 1, 1).to(hidden.dtype)
        return hidden, tuple(s * m for s in skips)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class ToyDDPM(L.LightningModule):
    """v- or eps-prediction DDPM with min-SNR loss weighting, an EMA copy of the weights and
    optional skip dropout."""

    def __init__(self, cfg: ToyTrainConfig, resuming: bool = False):
        super().__init__()
        self.cfg = cfg
        # a resumed run's weights come from its checkpoint: init_from need not exist any more
        self.unet = initial_unet(cfg, init_from=None if resuming else cfg.init_from)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.skip_dropout = SkipDropout(self.unet) if cfg.skip_dropout > 0 else None
        self.noise_scheduler = build_scheduler(cfg)
        acp = self.noise_scheduler.alphas_cumprod
        self.register_buffer("snr", acp / (1 - acp), persistent=False)

    def training_step(self, batch, batch_idx):
        step = self.global_step
        x0 = training_batch(self.cfg, step).to(self.device)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.cfg.seed, 2, step]).generate_state(1)[0]))
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g).to(self.device)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        if self.skip_dropout is not None:
            self.skip_dropout.mask = (torch.rand(x0.shape[0], generator=g) >= self.cfg.skip_dropout).to(self.device)
        try:
            pred = self.unet(xt, t).sample
        finally:
            if self.skip_dropout is not None:
                self.skip_dropout.mask = None
        if self.cfg.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
            weight = torch.clamp(self.snr[t], max=self.cfg.min_snr_gamma) / (self.snr[t] + 1)  # min-SNR for v
        else:
            target = noise
            weight = torch.clamp(self.snr[t], max=self.cfg.min_snr_gamma) / self.snr[t].clamp_min(1e-8)
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        """The optimiser step, then the EMA update: both happen before any callback (such as
        checkpointing) sees the step, so a checkpoint always holds a consistent state."""
        super().optimizer_step(*args, **kwargs)
        step = self.global_step  # steps taken before this one
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.unet.parameters()):
                e.lerp_(p, 1 - decay)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: _lr_factor(s, self.cfg.warmup_steps, self.cfg.steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Steps(torch.utils.data.Dataset):
    """Placeholder batches: the module renders its own data from the global step."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def export_model(module: ToyDDPM, out_dir: str | os.PathLike, dtype=torch.float32) -> Path:
    """Save the EMA U-Net and a DDPM scheduler in the flat hub-DDPM layout, atomically."""
    out = Path(out_dir)
    unet = copy.deepcopy(module.ema).to(dtype=dtype, device="cpu")
    with atomic_path(out) as tmp:
        unet.save_pretrained(tmp)
        module.noise_scheduler.save_pretrained(tmp)
        (tmp / "model_index.json").write_text(
            json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                        "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2)
        )
        (tmp / "training.json").write_text(
            json.dumps({"config": to_dict(module.cfg), "step": int(module.global_step)}, indent=2)
        )
    return out


def half_precision_copy(model_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy an exported model with its U-Net weights in float16 (half the size; this is what
    ships as the embedded default, ``pipeline/assets/toyfaces-ddpm``). Loading upcasts to the
    dtype the user asks for."""
    import shutil

    from diffusers import UNet2DModel

    src, dest = Path(model_dir), Path(dest)
    with atomic_path(dest) as tmp:
        UNet2DModel.from_pretrained(src, torch_dtype=torch.float16).save_pretrained(tmp)
        for name in ("scheduler_config.json", "model_index.json", "training.json"):
            shutil.copy2(src / name, tmp / name)
    return dest


class _Export(L.Callback):
    """Every `every` steps: export the EMA model and draw a sample grid of fixed seeds."""

    def __init__(self, cfg: ToyTrainConfig):
        self.cfg = cfg

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps:
            export_model(module, Path(self.cfg.out_dir) / "model")
        if step % self.cfg.sample_every == 0 or step == self.cfg.steps:
            from toyfaces.grids import save_model_grid

            save_model_grid(Path(self.cfg.out_dir) / "model", Path(self.cfg.out_dir) / "samples" / f"step-{step:06d}.png")


def train_toy(cfg: ToyTrainConfig) -> Path:
    """Train (or resume) and return the exported model directory."""
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    module = ToyDDPM(cfg, resuming=last.exists())  # a bad init_from fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        max_steps=cfg.steps,
        accelerator="auto",
        devices=1,
        logger=L.pytorch.loggers.CSVLogger(out, name="logs", version=0),
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=cfg.checkpoint_every, save_last=True,
                                                save_top_k=0),
            _Export(cfg),
        ],
        enable_model_summary=False,
        log_every_n_steps=25,
    )
    loader = torch.utils.data.DataLoader(_Steps(cfg.steps), batch_size=None, shuffle=False)
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    model = export_model(module, out / "model")
    half_precision_copy(model, out / "model-fp16")
    return model


def run_train_toy(cfg) -> Path:
    """CLI entry: ``hspace train-toy [train_toy.key=value ...]``, phase 1 of the embedded default."""
    out = train_toy(cfg.train_toy)
    print(f"trained model: {out} (float16 copy: {out.parent / 'model-fp16'}); phase 2: hspace finetune-toy")
    return out


def run_finetune_toy(cfg) -> Path:
    """CLI entry: ``hspace finetune-toy [finetune_toy.key=value ...]``, phase 2: the phase-1
    model fine-tuned with skip dropout."""
    out = train_toy(cfg.finetune_toy)
    print(f"fine-tuned model: {out} (float16 copy: {out.parent / 'model-fp16'}; the embedded default "
          f"is that copy in pipeline/assets/toyfaces-ddpm)")
    return out
