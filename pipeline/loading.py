"""Finding and loading a diffusers U-Net and its scheduler: embedded, local, hub or HF cache."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

from .errors import ModelLoadError
from .io import hash_tree

ASSETS = Path(__file__).resolve().parent / "assets"
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


def load_unet_and_scheduler(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[UNet2DModel, DDIMScheduler]:
    """Load a ``UNet2DModel`` and a DDIM scheduler (``clip_sample`` off) built from its config."""
    location, is_local = resolve(name_or_path)
    try:
        unet_sub = _subfolder(location, is_local, "unet", "config.json")
        unet = UNet2DModel.from_pretrained(location, subfolder=unet_sub, torch_dtype=dtype)
        sched_sub = _subfolder(location, is_local, "scheduler", "scheduler_config.json")
        config = DDIMScheduler.load_config(location, subfolder=sched_sub)
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if is_local:  # the folder is there: downloading is not the remedy
            raise ModelLoadError(f"could not load model {location}: {first}; the folder is damaged (check its "
                                 f"config.json, scheduler_config.json and weights, or copy it again)") from None
        raise ModelLoadError(f"could not load model {str(name_or_path)!r}: {first}. "
                             + _OFFLINE_HELP.format(name=name_or_path)) from None
    scheduler = DDIMScheduler.from_config(config, clip_sample=False)
    return unet, scheduler
