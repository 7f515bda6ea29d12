"""Finding and loading a diffusers model and its scheduler: embedded, local, hub or HF cache. The
family (model_index.json's ``_class_name``) loads its own networks (:mod:`pipeline.engine.families`)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler
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

    for filename in ("config.json", "unet/config.json", "transformer/config.json"):
        cached = try_to_load_from_cache(location, filename)
        if isinstance(cached, str):
            return f"{location}@{Path(cached).parent.name if filename == 'config.json' else Path(cached).parent.parent.name}"
    return location


def weights_fingerprint(modules: dict) -> str:
    """A short hash of loaded networks' weights ({component: module}; sums and squared sums of every tensor)."""
    import hashlib

    h = hashlib.sha256()
    state = {f"{c}.{k}" if c != "unet" else k: v for c, m in modules.items() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for name, p in sorted(state.items()):
            p = p.detach().double()
            h.update(f"{name}:{tuple(p.shape)}:{p.sum().item():.10e}:{p.square().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


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
_TOKENIZER_FILES = [("tokenizer_config.json",), ("tokenizer.json", "vocab.json", "spiece.model")]
_COMPONENT_FILES = {"unet": [("config.json",)], "transformer": [("config.json",)], "vae": [("config.json",)],
                    "vqvae": [("config.json",)], "text_encoder": [("config.json",)],
                    "text_encoder_2": [("config.json",)], "scheduler": [("scheduler_config.json",)],
                    "tokenizer": _TOKENIZER_FILES, "tokenizer_2": _TOKENIZER_FILES}


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


class Folder:
    """A model found by :func:`resolve`: its location, whether it is local, and its model_index.json
    (empty for the flat hub-DDPM layout). What a family's ``load`` reads its networks from; ``part``
    is the component being read (for the message when it cannot be)."""

    def __init__(self, location: str, is_local: bool, index: dict):
        self.location, self.is_local, self.index, self.part = location, is_local, index, "model"

    def subfolder(self, component: str, filename: str) -> str | None:
        """None where ``filename`` is at the root (hub DDPMs), else ``component`` (pipelines)."""
        return _subfolder(self.location, self.is_local, component, filename)

    def network(self, cls, subfolder: str | None, dtype: torch.dtype | None = None):
        """``cls.from_pretrained`` of the component in ``subfolder`` (None: the root), in ``dtype``."""
        self.part = subfolder or "model"
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        return cls.from_pretrained(self.location, subfolder=subfolder, **kwargs)

    def component(self, name: str, classes: dict, dtype: torch.dtype | None = None):
        """The component ``name``, of one of ``classes`` (class name -> class) as model_index.json says."""
        return self.network(_component_class(self.index, name, classes), name, dtype)


def load_pipeline(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict:
    """The networks of a model as its family's adapter, and the scheduler hspace samples with
    (:func:`~pipeline.engine.schedules.scheduler_from_config`): ``{"family", "scheduler"}``."""
    from pipeline.engine.families import FAMILIES
    from pipeline.engine.schedules import scheduler_from_config

    location, is_local = resolve(name_or_path)
    folder = Folder(location, is_local, {})
    try:
        kind, index = detect_family(location, is_local)
        if is_local:
            check_components(location, index)
        folder = Folder(location, is_local, index)
        family = FAMILIES[kind].load(folder, dtype)
        folder.part = "scheduler"
        config = DDIMScheduler.load_config(location, subfolder=folder.subfolder("scheduler", "scheduler_config.json"))
        return {"family": family, "scheduler": scheduler_from_config(config)}
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        part = folder.part
        what = "model" if part == "model" else f"the {part} of model"
        if is_local:  # the folder is there: downloading is not the remedy
            where = location if part == "model" else f"{location}/{part}"
            raise ModelLoadError(f"could not load {what} {location}: {first}; the folder is damaged (check the "
                                 f"config and weights in {where}, or copy the model again)") from None
        raise ModelLoadError(f"could not load {what} {str(name_or_path)!r}: {first}. "
                             + _OFFLINE_HELP.format(name=name_or_path)) from None
