"""Finding and loading a diffusers model (pixel, latent or text-to-image) and its scheduler: embedded,
local, hub or HF cache."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel
from safetensors import SafetensorError

from pipeline.errors import ModelLoadError
from pipeline.io import hash_tree

ASSETS = Path(__file__).resolve().parents[1] / "assets"
#: Models that ship inside the package, usable by name without any download.
EMBEDDED_MODELS = {"toyfaces": ASSETS / "toyfaces-ddpm"}

_OFFLINE_HELP = (
    "To use a hub model without internet: on a machine with internet run "
    "`huggingface-cli download {name}` (or `python -c \"from huggingface_hub import snapshot_download; "
    "snapshot_download('{name}')\"`), then either copy the Hugging Face cache (~/.cache/huggingface/hub, "
    "or $HF_HOME) to this machine and set HF_HUB_OFFLINE=1, or copy the downloaded folder here and give "
    "its path as model.name_or_path. The embedded default needs no download: model.name_or_path=toyfaces."
)


def resolve(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """(location, is_local): an embedded name, an existing directory, or else a hub id."""
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name]
        if not (path / "config.json").exists():
            raise ModelLoadError(f"the embedded model {name!r} is missing from {path}; reinstall the package")
        return str(path), True
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; model.name_or_path must be a model directory or a hub id")
        return str(path.resolve()), True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model directory {name} does not exist. " + _OFFLINE_HELP.format(name="<hub id>"))
    return name, False


def weights_identity(name_or_path: str | os.PathLike) -> str:
    """What identifies a model's weights without loading them: the content of a local folder
    (the embedded default included), or the cached snapshot (commit) of a hub id."""
    location, is_local = resolve(name_or_path)
    if is_local:
        return hash_tree(location)
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "unet/config.json"):
        cached = try_to_load_from_cache(location, filename)
        if isinstance(cached, str):
            return f"{location}@{Path(cached).parent.name if filename == 'config.json' else Path(cached).parent.parent.name}"
    return location


def _subfolder(location: str, is_local: bool, component: str, filename: str) -> str | None:
    """Hub DDPMs keep the U-Net at the root; pipelines keep it in unet/: find which."""
    if is_local:
        if (Path(location) / filename).exists():
            return None
        if (Path(location) / component / filename).exists():
            return component
        raise ModelLoadError(
            f"{location} has neither {filename} nor {component}/{filename}; expected a folder written by "
            f"save_pretrained (a hub DDPM repository or a diffusers pipeline)"
        )
    from huggingface_hub import file_exists, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    for sub in (None, component):
        path = filename if sub is None else f"{sub}/{filename}"
        if isinstance(try_to_load_from_cache(location, path), str):
            return sub
    try:
        for sub in (None, component):
            if file_exists(location, filename if sub is None else f"{sub}/{filename}"):
                return sub
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot reach model {location!r} ({type(e).__name__}). "
                             + _OFFLINE_HELP.format(name=location)) from None
    raise ModelLoadError(f"model {location!r} has no {filename}. " + _OFFLINE_HELP.format(name=location))


def _read_json(location: str, is_local: bool, filename: str) -> dict | None:
    """A JSON file of a local folder or a hub repository (the HF cache offline), or None."""
    import json

    if is_local:
        path = Path(location) / filename
        return json.loads(path.read_text()) if path.exists() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    cached = try_to_load_from_cache(location, filename)
    if not isinstance(cached, str):
        try:
            cached = hf_hub_download(location, filename)
        except EntryNotFoundError:
            return None
        except (HfHubHTTPError, OSError, ValueError):
            return None  # unreachable: _subfolder says so with the offline help
    return json.loads(Path(cached).read_text())


def detect_family(location: str, is_local: bool) -> tuple[str, dict]:
    """(family, model_index): from model_index.json's ``_class_name``, or ``pixel`` for the flat
    hub-DDPM layout (a UNet2DModel config.json at the root) and folders without an index."""
    from pipeline.engine.families import PIPELINE_FAMILIES

    index = _read_json(location, is_local, "model_index.json") or {}
    name = index.get("_class_name")
    if name is None:
        return "pixel", index
    if name not in PIPELINE_FAMILIES:
        raise ModelLoadError(f"{location} is a {name}; hspace loads the pipeline types "
                             f"{', '.join(sorted(PIPELINE_FAMILIES))}")
    return PIPELINE_FAMILIES[name], index


#: the components hspace loads from a pipeline folder, and the files (any one of each group) that must be in each
_COMPONENT_FILES = {"unet": [("config.json",)], "vae": [("config.json",)], "vqvae": [("config.json",)],
                    "text_encoder": [("config.json",)], "scheduler": [("scheduler_config.json",)],
                    "tokenizer": [("tokenizer_config.json",), ("tokenizer.json", "vocab.json")]}


def check_components(location: str, index: dict) -> None:
    """A local pipeline folder has a folder, with its config, for every component of model_index.json
    that hspace loads; else a ModelLoadError naming the component and the folder."""
    for component, files in _COMPONENT_FILES.items():
        entry = index.get(component)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
            continue
        folder = Path(location) / component
        lacking = [" or ".join(group) for group in files if not any((folder / f).is_file() for f in group)]
        if lacking and component in ("unet", "scheduler") and all((Path(location) / g[0]).is_file() for g in files):
            continue  # the hub DDPM layout: U-Net and scheduler configs at the root
        if lacking:
            what = f"no {component}/ folder" if not folder.is_dir() else f"no {lacking[0]} in {component}/"
            raise ModelLoadError(f"model folder {location} has {what}, though its model_index.json lists the "
                                 f"{component} ({entry[1]}); the copy is incomplete: copy or download the whole model "
                                 f"folder again")


def _component_class(index: dict, component: str, classes: dict):
    entry = index.get(component)
    name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    if name not in classes:
        raise ModelLoadError(f"component {component} is a {name}; hspace loads {', '.join(sorted(classes))} there")
    return classes[name]


def load_pipeline(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict:
    """The networks of a model, its family and a DDIM scheduler (``clip_sample`` off) built from its
    scheduler config: ``{"family", "unet", "scheduler"}`` plus ``autoencoder`` and ``component``
    (latent and text families) and ``text_encoder``, ``tokenizer`` (text family)."""
    location, is_local = resolve(name_or_path)
    part = "model"  # what is being loaded, for the message
    try:
        family, index = detect_family(location, is_local)
        if is_local:
            check_components(location, index)
        unet_sub = _subfolder(location, is_local, "unet", "config.json")
        out = {"family": family}
        if family == "text":
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import (
                CLIPTextModel,
                CLIPTextModelWithProjection,
                CLIPTokenizer,
                CLIPTokenizerFast,
            )

            part = "unet"
            out["unet"] = UNet2DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=dtype)
            part = "vae"
            out["autoencoder"] = AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=dtype)
            out["component"] = "vae"
            encoder = _component_class(index, "text_encoder", {"CLIPTextModel": CLIPTextModel,
                                                               "CLIPTextModelWithProjection": CLIPTextModelWithProjection})
            part = "text_encoder"
            out["text_encoder"] = encoder.from_pretrained(location, subfolder="text_encoder", torch_dtype=dtype)
            tokenizer = _component_class(index, "tokenizer", {"CLIPTokenizer": CLIPTokenizer,
                                                              "CLIPTokenizerFast": CLIPTokenizerFast})
            part = "tokenizer"
            out["tokenizer"] = tokenizer.from_pretrained(location, subfolder="tokenizer")
            if not 0 < out["tokenizer"].model_max_length <= 100_000:  # unset: transformers' 1e30, an overflow later
                raise ModelLoadError(f"the tokenizer of model {location} has no model_max_length (tokenizer/"
                                     f"tokenizer_config.json); copy or download the whole model folder again")
        else:
            part = unet_sub or "model"
            out["unet"] = UNet2DModel.from_pretrained(location, subfolder=unet_sub, torch_dtype=dtype)
        if family == "latent":
            from diffusers import AutoencoderKL, VQModel

            component = "vqvae" if "vqvae" in index else "vae"
            cls = _component_class(index, component, {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL})
            part = component
            out["autoencoder"] = cls.from_pretrained(location, subfolder=component, torch_dtype=dtype)
            out["component"] = component
        part = "scheduler"
        sched_sub = _subfolder(location, is_local, "scheduler", "scheduler_config.json")
        config = DDIMScheduler.load_config(location, subfolder=sched_sub)
        out["scheduler"] = DDIMScheduler.from_config(config, clip_sample=False)
        return out
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "model" if part == "model" else f"the {part} of model"
        if is_local:  # the folder is there: downloading is not the remedy
            folder = location if part == "model" else f"{location}/{part}"
            raise ModelLoadError(f"could not load {what} {location}: {first}; the folder is damaged (check the "
                                 f"config and weights in {folder}, or copy the model again)") from None
        raise ModelLoadError(f"could not load {what} {str(name_or_path)!r}: {first}. "
                             + _OFFLINE_HELP.format(name=name_or_path)) from None


def load_unet_and_scheduler(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[UNet2DModel, DDIMScheduler]:
    """Load a pixel-space ``UNet2DModel`` and a DDIM scheduler (``clip_sample`` off) built from its config."""
    parts = load_pipeline(name_or_path, dtype)
    if parts["family"] != "pixel":
        raise ModelLoadError(f"{name_or_path} is a {parts['family']} model; load it with HSpaceModel.from_pretrained")
    return parts["unet"], parts["scheduler"]
