"""CLIP zero-shot attribute scores (open_clip).

Registered as ``clip``: each attribute is a pair of text classes (positive, negative); its score is
``P(positive) = softmax(logit_scale * [cos(img, t_pos), cos(img, t_neg)])[0]`` in [0, 1], where
``t_pos``/``t_neg`` are class embeddings: every phrase of the class is put into every template,
encoded, L2-normalised, averaged and renormalised (CLIP's prompt ensembling).

Options (``annotate.options.clip.*``):

* ``model`` - an open_clip model name (default ``"ViT-B-32"``) or ``"hf-hub:org/name"``.
* ``pretrained`` - a pretrained tag of that model (default ``"openai"``; looked up in the Hugging
  Face cache, so with ``HF_HUB_OFFLINE=1`` a populated cache works offline), a local checkpoint
  file (e.g. ``open_clip_pytorch_model.bin``), or ``"hf-hub:org/name"`` (model and weights from
  the HF cache). A tag's QuickGELU setting is applied automatically (the OpenAI weights need it);
  for a checkpoint file set ``quick_gelu: true`` or use a ``*-quickgelu`` model name.
* ``prompts`` - ``"celeba40"`` (default: the 40 CelebA attributes under their CelebA names,
  phrases ensembled over ``templates``), ``"paper"`` (the paper's Table-1 protocol: five single
  prompts, no templates) or a dict ``{attribute: {"positive": [...], "negative": [...]}}``.
* ``templates`` - prompt templates with one ``{}``; default ``DEFAULT_TEMPLATES`` for
  ``celeba40`` and dicts, ``("{}",)`` (the phrase as is) for ``paper``.
* ``attributes`` - optional subset of the preset's attributes to score.
* ``quick_gelu`` - force QuickGELU activations (None: from the pretrained tag).

Class embeddings are cached on disk per (weights, texts): :func:`cached_text_features`
(``$HSPACE_CACHE/clip-text``, default ``~/.cache/hspace/clip-text``; ``HSPACE_CACHE=off``: no cache).

Input size and mean/std come from the model's preprocess config (224 px, OpenAI mean/std for
ViT-B-32); the base class resizes (squashes) the image, which equals CLIP's resize + centre crop
for square images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from annotators.base import Annotator
from pipeline.errors import ConfigError, ModelLoadError, StorageError
from pipeline.io import hash_file, hash_json, save_safetensors

#: CLIP-style ensemble templates, applied to each class phrase.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a close-up photo of {}.",
    "a cropped photo of {}.",
    "a portrait photo of {}.",
    "a good photo of {}.",
    "a photo of the face of {}.",
)

#: The paper's Table-1 prompts (Sec. 5): positive vs negative, single prompts, no templates.
#: (The paper's sentence lists "A man"/"A woman" and "An old person"/"A young person" for
#: "age and gender respectively", an evident swap: gender is man vs woman, age old vs young.)
PAPER_PROMPTS: dict[str, dict[str, list[str]]] = {
    "smile": {"positive": ["A smiling person"], "negative": ["A person"]},
    "glasses": {"positive": ["A person wearing glasses"], "negative": ["A person"]},
    "age": {"positive": ["An old person"], "negative": ["A young person"]},
    "gender": {"positive": ["A man"], "negative": ["A woman"]},
    "hat": {"positive": ["A person wearing a hat"], "negative": ["A person"]},
}

_OTHER_HAIR = {
    "black": "a person with black hair", "blond": "a person with blond hair",
    "brown": "a person with brown hair", "gray": "a person with gray hair",
}


def _hair(colour: str) -> dict[str, list[str]]:
    return {"positive": [_OTHER_HAIR[colour]], "negative": [v for k, v in _OTHER_HAIR.items() if k != colour]}


def _pair(positive, negative) -> dict[str, list[str]]:
    def as_list(v):
        return [v] if isinstance(v, str) else list(v)

    return {"positive": as_list(positive), "negative": as_list(negative)}


#: The 40 CelebA attributes (CelebA's names and order), phrased for the templates above.
CELEBA40_PROMPTS: dict[str, dict[str, list[str]]] = {
    "5_o_Clock_Shadow": _pair(["a man with a five o'clock shadow", "a man with light stubble"],
                              "a person with a clean-shaven face"),
    "Arched_Eyebrows": _pair("a person with arched eyebrows", "a person with straight eyebrows"),
    "Attractive": _pair("an attractive person", "an unattractive person"),
    "Bags_Under_Eyes": _pair("a person with bags under the eyes", "a person with smooth skin under the eyes"),
    "Bald": _pair("a bald person", "a person with a full head of hair"),
    "Bangs": _pair("a person with bangs", "a person with an uncovered forehead"),
    "Big_Lips": _pair("a person with big lips", "a person with thin lips"),
    "Big_Nose": _pair("a person with a big nose", "a person with a small nose"),
    "Black_Hair": _hair("black"),
    "Blond_Hair": _hair("blond"),
    "Blurry": _pair("a blurry, out-of-focus face", "a sharp, in-focus face"),
    "Brown_Hair": _hair("brown"),
    "Bushy_Eyebrows": _pair("a person with bushy eyebrows", "a person with thin eyebrows"),
    "Chubby": _pair("a chubby person", "a slim person"),
    "Double_Chin": _pair("a person with a double chin", "a person with a well-defined jawline"),
    "Eyeglasses": _pair("a person wearing eyeglasses", "a person without glasses"),
    "Goatee": _pair("a man with a goatee", "a person with a clean-shaven chin"),
    "Gray_Hair": _hair("gray"),
    "Heavy_Makeup": _pair("a person wearing heavy makeup", "a person wearing no makeup"),
    "High_Cheekbones": _pair("a person with high cheekbones", "a person with low cheekbones"),
    "Male": _pair("a man", "a woman"),
    "Mouth_Slightly_Open": _pair("a person with the mouth slightly open", "a person with the mouth closed"),
    "Mustache": _pair("a man with a mustache", "a person with a clean-shaven upper lip"),
    "Narrow_Eyes": _pair("a person with narrow eyes", "a person with wide open eyes"),
    "No_Beard": _pair(["a person with no beard", "a clean-shaven person"], "a man with a beard"),
    "Oval_Face": _pair("a person with an oval face", ["a person with a round face", "a person with a square face"]),
    "Pale_Skin": _pair("a person with pale skin", ["a person with tanned skin", "a person with dark skin"]),
    "Pointy_Nose": _pair("a person with a pointy nose", "a person with a rounded nose"),
    "Receding_Hairline": _pair("a person with a receding hairline", "a person with a full hairline"),
    "Rosy_Cheeks": _pair("a person with rosy cheeks", "a person with an even skin tone on the cheeks"),
    "Sideburns": _pair("a man with sideburns", "a person without sideburns"),
    "Smiling": _pair("a smiling person", "a person with a neutral expression"),
    "Straight_Hair": _pair("a person with straight hair", ["a person with wavy hair", "a person with curly hair"]),
    "Wavy_Hair": _pair("a person with wavy hair", "a person with straight hair"),
    "Wearing_Earrings": _pair("a person wearing earrings", "a person without earrings"),
    "Wearing_Hat": _pair("a person wearing a hat", "a person with no hat on"),
    "Wearing_Lipstick": _pair("a person wearing lipstick", "a person wearing no lipstick"),
    "Wearing_Necklace": _pair("a person wearing a necklace", "a person without a necklace"),
    "Wearing_Necktie": _pair("a person wearing a necktie", "a person without a necktie"),
    "Young": _pair("a young person", "an old person"),
}

PRESETS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "celeba40": (CELEBA40_PROMPTS, DEFAULT_TEMPLATES),
    "paper": (PAPER_PROMPTS, ("{}",)),
}


def resolve_prompts(prompts: str | Mapping, templates: Sequence[str] | None = None,
                    attributes: Sequence[str] | None = None) -> tuple[dict[str, dict[str, list[str]]], tuple[str, ...]]:
    """(validated {attribute: {"positive": [...], "negative": [...]}}, templates) for a preset
    name or a dict; ``templates=None`` takes the preset's default."""
    if isinstance(prompts, str):
        if prompts not in PRESETS:
            raise ConfigError(f"clip: unknown prompts preset {prompts!r}; use one of {sorted(PRESETS)} "
                              f"or a dict {{attribute: {{positive: [...], negative: [...]}}}}")
        table, default_templates = PRESETS[prompts]
    elif isinstance(prompts, Mapping):
        table, default_templates = prompts, DEFAULT_TEMPLATES
    else:
        raise ConfigError(f"clip: prompts must be a preset name or a dict, got {type(prompts).__name__}")
    resolved = {}
    for attr, classes in table.items():
        if not isinstance(classes, Mapping) or set(classes) != {"positive", "negative"}:
            raise ConfigError(f"clip: prompts[{attr!r}] must be {{positive: [...], negative: [...]}}, got {classes!r}")
        pair = {}
        for side in ("positive", "negative"):
            phrases = [classes[side]] if isinstance(classes[side], str) else list(classes[side])
            if not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
                raise ConfigError(f"clip: prompts[{attr!r}][{side!r}] must be a non-empty list of phrases")
            pair[side] = phrases
        resolved[str(attr)] = pair
    if not resolved:
        raise ConfigError("clip: prompts defines no attributes")
    if attributes is not None:
        unknown = [a for a in attributes if a not in resolved]
        if unknown:
            raise ConfigError(f"clip: attributes {unknown} are not in the prompts; known: {list(resolved)}")
        resolved = {a: resolved[a] for a in attributes}
    templates = tuple(default_templates if templates is None else ([templates] if isinstance(templates, str) else templates))
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ConfigError(f"clip: templates must be a non-empty list of strings with exactly one '{{}}', got {templates!r}")
    return resolved, templates


def _short(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def _looks_like_path(value: str) -> bool:
    return (os.sep in value or "/" in value or value.startswith((".", "~"))
            or Path(value).suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"))


_SUPPLY_HELP = (
    "On a machine with internet download {what}, copy it here and set "
    "annotate.options.clip.pretrained=/path/to/that/file (with annotate.options.clip.model={model}); or copy a "
    "Hugging Face cache that holds it (~/.cache/huggingface/hub or $HF_HOME) to this machine and set HF_HUB_OFFLINE=1."
)


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _cached_file(repo: str, filenames: Sequence[str], cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        path = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(path, str):
            return path
    return None


def load_open_clip(model: str = "ViT-B-32", pretrained: str | None = "openai", quick_gelu: bool | None = None,
                   cache_dir: str | None = None):
    """(open_clip model in eval mode on the CPU, tokenizer); user-fixable failures raise
    ``ConfigError`` (unknown model/tag) or ``ModelLoadError`` (weights missing or unreadable).
    Files already in the Hugging Face cache are used without touching the network."""
    import open_clip

    if not pretrained:
        raise ConfigError("clip: annotate.options.clip.pretrained is not set; give a pretrained tag (e.g. 'openai'), "
                          "a checkpoint file path, or 'hf-hub:org/name' (random CLIP weights would score nothing)")
    pretrained = str(pretrained)
    if pretrained.startswith("hf-hub:"):
        model = pretrained
    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
        help_ = (f"the clip annotator needs the open_clip model {model} (https://huggingface.co/{repo}: "
                 f"open_clip_config.json and its weights), which is not in the local Hugging Face cache{{why}}. "
                 f"On a machine with internet run `huggingface-cli download {repo}`, copy the Hugging Face cache "
                 f"(~/.cache/huggingface/hub or $HF_HOME) to this machine and set HF_HUB_OFFLINE=1.")
        if _offline() and _cached_file(repo, ["open_clip_config.json"], cache_dir) is None:
            raise ModelLoadError(help_.format(why=" and HF_HUB_OFFLINE is set"))
        try:
            net = open_clip.create_model(model, device="cpu", cache_dir=cache_dir)
            tokenizer = open_clip.get_tokenizer(model, cache_dir=cache_dir)
        except Exception as e:  # huggingface_hub / open_clip raise many types; report one line
            raise ModelLoadError(help_.format(why=f" and cannot be downloaded ({_short(e, 200)})")) from None
        net.hspace_weights = model  # the hub name (its weights come with it): the text-embedding cache's key
        return net.eval(), tokenizer

    name = model.replace("/", "-")
    if open_clip.get_model_config(name) is None:
        raise ConfigError(f"clip: unknown open_clip model {model!r} (annotate.options.clip.model); e.g. ViT-B-32, "
                          f"ViT-B-16, ViT-L-14 - see open_clip.list_models()")
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        if quick_gelu is None:
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        source, cached = tag_cfg.get("hf_hub", ""), None
        if source:
            repo, filename = os.path.split(source)  # "org/name/" means the default file name
            filename = filename or "open_clip_pytorch_model.bin"
            # open_clip prefers a safetensors twin of the file when the repository has one
            twin = ("open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin"
                    else str(Path(filename).with_suffix(".safetensors")))
            cached = _cached_file(repo, [twin, filename], cache_dir)
            what = (f"open_clip's checkpoint for model {name} tag {pretrained!r} "
                    f"(https://huggingface.co/{repo}/resolve/main/{filename})")
        else:
            what = f"open_clip's checkpoint for model {name} tag {pretrained!r} ({tag_cfg.get('url', '')})"
        preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        if cached:
            return _load_file(open_clip, name, cached, quick_gelu, preprocess), open_clip.get_tokenizer(name)
        if _offline():
            raise ModelLoadError(f"the clip annotator needs {what}, which is not in the local Hugging Face cache, "
                                 f"and this machine is offline (HF_HUB_OFFLINE is set). "
                                 + _SUPPLY_HELP.format(what="that file", model=name))
        try:
            net = open_clip.create_model(name, pretrained=pretrained, device="cpu", force_quick_gelu=bool(quick_gelu),
                                         cache_dir=cache_dir)
        except Exception as e:
            raise ModelLoadError(f"the clip annotator needs {what}, which is not in the local cache and cannot be "
                                 f"downloaded ({_short(e, 200)}). " + _SUPPLY_HELP.format(what="that file", model=name)) from None
        net.hspace_weights = f"{name}:{pretrained}:quick_gelu={bool(quick_gelu)}"  # a pretrained tag names its weights
        return net.eval(), open_clip.get_tokenizer(name)

    path = Path(pretrained).expanduser()
    if not path.is_file():
        if _looks_like_path(pretrained):
            raise ModelLoadError(
                f"the clip annotator needs its weights: checkpoint file {path} does not exist. This machine is offline. "
                + _SUPPLY_HELP.format(what=f"the open_clip checkpoint for model {name} (e.g. open_clip_pytorch_model.bin "
                                           f"from the Hugging Face repository of one of its pretrained tags)", model=name))
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"clip: {pretrained!r} is neither a pretrained tag of {name} ({tags or 'none known'}) "
                          f"nor an existing checkpoint file (annotate.options.clip.pretrained)")
    return _load_file(open_clip, name, str(path), quick_gelu, {}), open_clip.get_tokenizer(name)


def _load_file(open_clip, name: str, path: str, quick_gelu: bool | None, preprocess: dict):
    try:
        net = open_clip.create_model(name, pretrained=path, device="cpu", force_quick_gelu=bool(quick_gelu),
                                     force_preprocess_cfg=preprocess)
    except Exception as e:
        raise ModelLoadError(f"the clip annotator cannot load checkpoint {path} into open_clip model {name} "
                             f"({_short(e)}); check that annotate.options.clip.model matches the checkpoint") from None
    net.hspace_weights = f"{name}:quick_gelu={bool(quick_gelu)}:sha256={file_hash(path)}"  # the file's content
    return net.eval()


_FILE_HASHES: dict[tuple, str] = {}


def file_hash(path: str) -> str:
    """Content hash of a weights file, once per process (keyed by path, size and modification time)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = hash_file(path)
    return _FILE_HASHES[key]


def embedding_cache_dir() -> Path | None:
    """Where CLIP text embeddings are cached: ``$HSPACE_CACHE/clip-text`` (default
    ``~/.cache/hspace/clip-text``); ``HSPACE_CACHE=off`` turns the cache off."""
    root = os.environ.get("HSPACE_CACHE", "")
    if root.lower() in ("off", "0", "false", "no"):
        return None
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "hspace") / "clip-text"


def cached_text_features(weights: str | None, texts: Sequence[str], encode) -> torch.Tensor:
    """``encode(texts)`` -> (N, D) float32, read from the disk cache when these exact texts were
    encoded before by the same weights (``weights``: their identity, None: no cache); written
    there (atomically) otherwise. A damaged cache file is ignored and rewritten."""
    folder = embedding_cache_dir() if weights else None
    if folder is None:
        return encode(texts)
    from safetensors.torch import load_file

    path = folder / f"{hash_json('clip-text', weights, list(texts))}.safetensors"
    if path.is_file():
        try:
            feats = load_file(str(path))["features"]
            if feats.shape[0] == len(texts):
                return feats
        except Exception:  # noqa: BLE001 (a damaged cache file: encode again)
            pass
    feats = encode(texts)
    try:
        save_safetensors({"features": feats.float()}, path, {"weights": weights, "texts": str(len(texts))})
    except StorageError:  # a read-only cache folder costs time, not the run
        pass
    return feats


class ClipAnnotator(Annotator):
    """CLIP zero-shot P(positive prompt) per attribute; options in the module docstring.

    ``text_features``: (A, 2, D) unit class embeddings, [:, 0] positive, [:, 1] negative.
    """

    name = "clip"

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = "openai", prompts: str | Mapping = "celeba40",
                 templates: Sequence[str] | None = None, attributes: Sequence[str] | None = None,
                 quick_gelu: bool | None = None, cache_dir: str | None = None):
        table, templates = resolve_prompts(prompts, templates, attributes)  # validate before loading weights
        net, tokenizer = load_open_clip(model, pretrained, quick_gelu=quick_gelu, cache_dir=cache_dir)
        self._setup(net, tokenizer, table, templates)

    @classmethod
    def columns(cls, options: Mapping) -> tuple[str, ...]:
        """The attributes the prompts option (with ``attributes``) defines; no weights loaded."""
        return tuple(resolve_prompts(options.get("prompts", "celeba40"), options.get("templates"),
                                     options.get("attributes"))[0])

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, prompts: str | Mapping = "celeba40",
                   templates: Sequence[str] | None = None, attributes: Sequence[str] | None = None) -> "ClipAnnotator":
        """An annotator around an in-memory open_clip model (``encode_image``, ``encode_text``,
        ``logit_scale``) and its tokenizer (list of str -> (N, L) token ids)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, *resolve_prompts(prompts, templates, attributes))
        return self

    def _setup(self, model, tokenizer, table: dict, templates: tuple[str, ...]) -> None:
        from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, get_model_preprocess_cfg

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompts = table
        self.templates = templates
        self.attributes = tuple(table)
        cfg = dict(get_model_preprocess_cfg(model) or {})
        size = cfg.get("size", getattr(getattr(model, "visual", None), "image_size", 224))
        self.input_size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        self.mean = tuple(cfg.get("mean") or OPENAI_DATASET_MEAN)
        self.std = tuple(cfg.get("std") or OPENAI_DATASET_STD)
        self.device = next(model.parameters()).device
        self.logit_scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
        classes = [table[a][side] for a in self.attributes for side in ("positive", "negative")]
        self.text_features = self.class_embeddings(classes).view(len(self.attributes), 2, -1)

    def class_embeddings(self, classes: Sequence[Sequence[str]]) -> torch.Tensor:
        """(C, D) unit class embeddings: for each class (a list of phrases), the renormalised mean
        of the unit text embeddings of every phrase x template."""
        texts = [t.format(p) for phrases in classes for p in phrases for t in self.templates]
        feats = cached_text_features(getattr(self.model, "hspace_weights", None), texts, self.encode_texts)
        feats = F.normalize(feats.to(self.device), dim=-1).split([len(phrases) * len(self.templates) for phrases in classes])
        return F.normalize(torch.stack([f.mean(0) for f in feats]), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 text embeddings (not normalised), 512 texts per call."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        self.model.eval()
        with torch.no_grad():
            return torch.cat([self.model.encode_text(tokens[i:i + 512]).float() for i in range(0, len(tokens), 512)])

    def to(self, device):
        super().to(device)
        self.text_features = self.text_features.to(self.device)
        return self

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, S, S) CLIP-normalised -> {attribute: (B,) P(positive)}."""
        dtype = next(self.model.parameters()).dtype
        img = F.normalize(self.model.encode_image(x.to(dtype)).float(), dim=-1)          # (B, D)
        sims = torch.einsum("bd,akd->bak", img, self.text_features.to(img.device).float())  # (B, A, 2)
        probs = torch.softmax(self.logit_scale * sims, dim=-1)[..., 0]
        return {a: probs[:, i] for i, a in enumerate(self.attributes)}
