"""Each model family sampled by hspace (h recorded at every step) against its own diffusers pipeline.

Families: ``pixel`` (the embedded toyfaces DDPM, 32 px), ``ldm`` (a tiny VQ LDMPipeline), ``sd`` (a tiny
StableDiffusionPipeline), and the tiny random-weight pipelines of pipeline/testing/tiny_families.py
(``sdxl``, ``dit``, ``pixart_sigma``, ``sd3``, ``flux``; 16 px, FLUX 32 px). The same folder is loaded by
``HSpaceModel.from_config`` and ``DiffusionPipeline.from_pretrained`` (DDIM, eta 0, from the saved
scheduler's config where the family is not flow-matching, as the tests do); same steps, batch, guidance,
prompt or class, output_type="pt", and the initial latents hspace drew from the seeds (the pixel, LDM and
DiT pipelines draw their own from a generator: same work). Per family: a warm-up of each, then
``--repeats`` rounds of hspace then pipeline (ABAB...), so that the machine's drift cancels in the per-round
ratio. ratio = pipeline s / hspace s (higher is better; target >= 0.97): the median of the rounds' ratios and
their min..max; target "yes" when every round meets it, "median" when only the median does.

    python bench/families.py [--families pixel ldm sd sdxl dit pixart_sigma sd3 flux] [--batch 4]
                             [--steps 4] [--repeats 5] [--threads 1] [--devices cpu [cuda]]

``--devices`` defaults to cpu, and cuda too when a CUDA device exists. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from pipeline import HSpaceModel
from pipeline.config import load_config
from pipeline.engine.loading import resolve
from pipeline.testing import tiny_families

FAMILIES = ("pixel", "ldm", "sd", "sdxl", "dit", "pixart_sigma", "sd3", "flux")
PROMPT, CLASS, GUIDANCE, FLUX_SIZE, TARGET = "a photo of a cat", "goldfish", 4.0, 32, 0.97
TEXT = ("sd", "sdxl", "pixart_sigma", "sd3", "flux")


def tiny_ldm(seed: int = 0):
    """A VQ LDMPipeline (CompVis/ldm-celebahq-256's layout): 2x VQ autoencoder, 8x8x3 latents, 2-level U-Net."""
    from diffusers import LDMPipeline, UNet2DModel, VQModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vq = VQModel(block_out_channels=(8, 16), latent_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                     num_vq_embeddings=32, vq_embed_dim=3, sample_size=16)
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                           norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        return LDMPipeline(vqvae=vq.eval(), unet=unet.eval(), scheduler=DDIMScheduler(clip_sample=False))


def tiny_sd(seed: int = 0):
    """A StableDiffusionPipeline with SD 1.x's scheduler settings: CLIP text encoder of width 16, 2x KL
    autoencoder (SD's scaling), 2-level cross-attention U-Net."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_families.clip_tokenizer(16)
        text_encoder = tiny_families.clip_text_encoder(tokenizer, 16, 2, 2, False, 16)
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                    cross_attention_dim=16, attention_head_dim=2,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(vae=tiny_families.autoencoder("dit", "tiny"), text_encoder=text_encoder,
                                       tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


def save_family(family: str, root: Path) -> str:
    """The family's model folder (toyfaces: the embedded one; the others saved under ``root``)."""
    if family == "pixel":
        return resolve("toyfaces")[0]
    folder = root / family
    if family in ("ldm", "sd"):
        (tiny_ldm() if family == "ldm" else tiny_sd()).save_pretrained(folder)
    else:
        tiny_families.save(family, folder)
    return str(folder)


def hspace_model(family: str, folder: str, steps: int, device: str) -> HSpaceModel:
    overrides = [f"model.name_or_path={folder}", f"model.num_inference_steps={steps}", f"model.device={device}"]
    if family in TEXT:
        overrides += [f"model.prompt={PROMPT}", f"model.guidance_scale={GUIDANCE}"]
    if family == "dit":
        overrides += [f"model.class_label={CLASS}", f"model.guidance_scale={GUIDANCE}"]
    if family == "flux":
        overrides += [f"model.height={FLUX_SIZE}", f"model.width={FLUX_SIZE}"]
    return HSpaceModel.from_config(load_config(None, overrides))


def diffusers_pipeline(family: str, folder: str, device: str):
    """The folder's own pipeline; DDIM from the saved config unless it is flow-matching (pixel: DDIMPipeline)."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    if family == "pixel":
        pipe = DDIMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_call(family: str, pipe, x_T: torch.Tensor, steps: int):
    """() -> the pipeline's output for a batch like x_T's, from x_T where the family takes latents (TEXT)."""
    B, common = len(x_T), {"num_inference_steps": steps, "output_type": "pt"}
    generator = torch.Generator().manual_seed(0)
    if family in ("pixel", "ldm"):  # LDMPipeline returns numpy whatever output_type says
        return lambda: pipe(batch_size=B, generator=generator, eta=0.0, **common)
    if family == "dit":
        labels = pipe.get_label_ids([CLASS] * B)
        return lambda: pipe(class_labels=labels, generator=generator, guidance_scale=GUIDANCE, **common)
    side = FLUX_SIZE if family == "flux" else x_T.shape[-1] * pipe.vae_scale_factor
    latents = FluxPipeline._pack_latents(x_T, B, *x_T.shape[1:]) if family == "flux" else x_T
    kw = {"use_resolution_binning": False, "clean_caption": False} if family == "pixart_sigma" else {}
    return lambda: pipe(prompt=[PROMPT] * B, latents=latents.clone(), height=side, width=side, guidance_scale=GUIDANCE,
                        **kw, **common)


def interleaved(calls: dict, repeats: int, device: str) -> tuple[dict, dict]:
    """A warm-up of each call (its result kept), then ``repeats`` rounds calling each in turn:
    ({name: [seconds per round]}, {name: warm-up result})."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    first = {name: call() for name, call in calls.items()}
    seconds: dict = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            seconds[name].append(time.perf_counter() - t0)
    return seconds, first


@torch.no_grad()
def bench_family(family: str, folder: str, batch: int, steps: int, repeats: int, device: str = "cpu") -> dict:
    """One family's row: medians of hspace's and the pipeline's seconds per batch, the per-round ratios'
    median (pipeline / hspace) and min..max, and max |image difference| where the latents are shared."""
    model, pipe = hspace_model(family, folder, steps, device), diffusers_pipeline(family, folder, device)
    seeds = list(range(batch))
    x_T = model.initial_noise(seeds).to(device)
    run_pipe = pipeline_call(family, pipe, x_T, steps)
    seconds, first = interleaved({"hspace": lambda: model.sample(seeds), "pipeline": run_pipe}, repeats, device)
    ours = first["hspace"]
    diff = (ours.images.cpu() / 2 + 0.5 - first["pipeline"].images.cpu()).abs().max().item() if family in TEXT else None
    ratios = [p / h for p, h in zip(seconds["pipeline"], seconds["hspace"])]
    ratio = statistics.median(ratios)
    return {"family": family, "device": device, "pipeline_s": statistics.median(seconds["pipeline"]),
            "hspace_s": statistics.median(seconds["hspace"]), "ratio": ratio, "ratio_min": min(ratios),
            "ratio_max": max(ratios), "target": "yes" if min(ratios) >= TARGET else "median" if ratio >= TARGET else "no",
            "max_abs_diff": diff, "h_shape": tuple(ours.h.shape[2:])}


def run(families, batch: int, steps: int, repeats: int, devices=("cpu",), root=None) -> list[dict]:
    """:func:`bench_family` for each family and device, the folders saved once under ``root`` (default: a
    temporary folder, removed after)."""
    with tempfile.TemporaryDirectory(prefix="hspace-bench-families-") as tmp:
        root = Path(root or tmp)
        folders = {family: save_family(family, root) for family in families}
        return [bench_family(f, folders[f], batch, steps, repeats, d) for d in devices for f in families]


def table(rows: list[dict]) -> str:
    lines = [f"| family | device | h shape | pipeline s/batch | hspace s/batch | ratio (min..max) | >= {TARGET} | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        lines.append(f"| {r['family']} | {r['device']} | {'x'.join(map(str, r['h_shape']))} | {r['pipeline_s']:.4f} | "
                     f"{r['hspace_s']:.4f} | {r['ratio']:.3f} ({r['ratio_min']:.3f}..{r['ratio_max']:.3f}) | "
                     f"{r['target']} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--devices", nargs="+", default=["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    rows = []
    for device in args.devices:
        for family in args.families:
            rows += run([family], args.batch, args.steps, args.repeats, [device])
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nbatch {args.batch}, T={args.steps}, guidance {GUIDANCE}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved rounds; ratio = pipeline / hspace, target >= {TARGET}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
