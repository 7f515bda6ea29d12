"""Annotators, offline and on the CPU: CLIP zero-shot on a tiny random open_clip model, MTCNN
face/pose on a real photograph (scikit-image's astronaut), and the CelebA / Hopenet classifiers
with random weights saved to and reloaded from checkpoint files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from annotators.base import build_annotator
from pipeline.errors import ConfigError, ModelLoadError

CELEBA_NAMES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU forwards: a second thread only adds contention

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

# ----------------------------------------------------------------------------------------- CLIP

TINY_CLIP = "hspace-test-tiny-clip"
PAPER_PAIRS = {  # Table 1 of the paper: attribute -> (positive, negative)
    "smile": ("A smiling person", "A person"),
    "glasses": ("A person wearing glasses", "A person"),
    "age": ("An old person", "A young person"),
    "gender": ("A man", "A woman"),
    "hat": ("A person wearing a hat", "A person"),
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(random tiny open_clip model, its tokenizer, its state dict saved to a file)."""
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP).eval()
    ckpt = d / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return model, open_clip.get_tokenizer(TINY_CLIP), ckpt


def clip_reference(model, tokenizer, images, positive, negative, templates):
    """P(positive) computed from scratch: 32x32 images in [-1, 1] -> OpenAI normalisation ->
    cosine similarities with template-ensembled class embeddings -> softmax of the pair."""
    pixels = ((images + 1) / 2 - OPENAI_MEAN) / OPENAI_STD
    with torch.no_grad():
        img = F.normalize(model.encode_image(pixels), dim=-1)

        def cls(phrases):
            emb = F.normalize(model.encode_text(tokenizer([t.format(p) for p in phrases for t in templates])), dim=-1)
            return F.normalize(emb.mean(0), dim=-1)

        logits = model.logit_scale.exp() * torch.stack([img @ cls(positive), img @ cls(negative)], dim=-1)
    return logits.softmax(-1)[:, 0]


def test_clip_paper_preset_is_table1_protocol(tiny_clip):
    from annotators.clip import ClipAnnotator

    model, tok, _ = tiny_clip
    a = ClipAnnotator.from_model(model, tok, prompts="paper")
    assert a.attributes == tuple(PAPER_PAIRS)
    assert a.prompts == {k: {"positive": [p], "negative": [n]} for k, (p, n) in PAPER_PAIRS.items()}
    assert a.templates == ("{}",)  # single prompts, no ensembling
    assert a.input_size == (32, 32)
    np.testing.assert_allclose(a.mean, OPENAI_MEAN.flatten().numpy(), rtol=1e-6)
    np.testing.assert_allclose(a.std, OPENAI_STD.flatten().numpy(), rtol=1e-6)

    torch.manual_seed(1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    out = a(x)
    assert list(out) == list(PAPER_PAIRS)
    for attr, (pos, neg) in PAPER_PAIRS.items():
        v = out[attr]
        assert v.shape == (3,) and v.dtype == torch.float32 and not v.requires_grad
        assert ((v >= 0) & (v <= 1)).all()
        torch.testing.assert_close(v, clip_reference(model, tok, x, [pos], [neg], ["{}"]), atol=1e-5, rtol=0)
        # the pair's order matters: these scores are not the trivial 0.5 a swap would leave unchanged
        assert (v - 0.5).abs().max() > 1e-3


def test_clip_celeba40_preset_ensembles_templates(tiny_clip):
    from annotators.clip import DEFAULT_TEMPLATES, ClipAnnotator

    model, tok, _ = tiny_clip
    a = ClipAnnotator.from_model(model, tok)  # default preset: celeba40
    assert list(a.attributes) == CELEBA_NAMES
    assert a.templates == DEFAULT_TEMPLATES and len(a.templates) >= 3
    assert all(t.count("{}") == 1 for t in a.templates)
    for attr, classes in a.prompts.items():
        assert classes["positive"] and classes["negative"]
        assert not set(classes["positive"]) & set(classes["negative"]), attr
    assert "a man" in a.prompts["Male"]["positive"] and "a woman" in a.prompts["Male"]["negative"]

    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = a(x)
    assert list(out) == CELEBA_NAMES
    assert all(v.shape == (2,) and ((v >= 0) & (v <= 1)).all() for v in out.values())
    for attr in ("Smiling", "Black_Hair", "No_Beard", "Oval_Face"):
        ref = clip_reference(model, tok, x, a.prompts[attr]["positive"], a.prompts[attr]["negative"], DEFAULT_TEMPLATES)
        torch.testing.assert_close(out[attr], ref, atol=1e-5, rtol=0)
    # images of another size are resized to the model's input
    assert a(torch.rand(2, 3, 48, 40) * 2 - 1)["Male"].shape == (2,)


def test_clip_custom_prompts_templates_and_subset(tiny_clip):
    from annotators.clip import ClipAnnotator

    model, tok, _ = tiny_clip
    prompts = {"cat": {"positive": ["a cat", "a kitten"], "negative": "a dog"},
               "red": {"positive": ["something red"], "negative": ["something blue", "something green"]}}
    templates = ["a photo of {}.", "{} in the wild"]
    a = ClipAnnotator.from_model(model, tok, prompts=prompts, templates=templates)
    torch.manual_seed(3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = a(x)
    assert list(out) == ["cat", "red"]
    torch.testing.assert_close(out["cat"], clip_reference(model, tok, x, ["a cat", "a kitten"], ["a dog"], templates),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(out["red"], clip_reference(model, tok, x, ["something red"],
                                                          ["something blue", "something green"], templates), atol=1e-5, rtol=0)
    sub = ClipAnnotator.from_model(model, tok, prompts="paper", attributes=["gender", "smile"])
    assert list(sub(x)) == ["gender", "smile"]
    with pytest.raises(ConfigError, match="Smile"):
        ClipAnnotator.from_model(model, tok, attributes=["Smile"])
    with pytest.raises(ConfigError, match="preset"):
        ClipAnnotator.from_model(model, tok, prompts="celeba41")
    with pytest.raises(ConfigError, match="templates"):
        ClipAnnotator.from_model(model, tok, templates=["no placeholder"])
    with pytest.raises(ConfigError, match="negative"):
        ClipAnnotator.from_model(model, tok, prompts={"x": {"positive": ["a"]}})


def test_clip_loads_a_local_checkpoint_file(tiny_clip):
    from annotators.clip import ClipAnnotator

    model, tok, ckpt = tiny_clip
    a = build_annotator("clip", {"model": TINY_CLIP, "pretrained": str(ckpt), "prompts": "paper"})
    ref = ClipAnnotator.from_model(model, tok, prompts="paper")
    torch.manual_seed(4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    got, want = a(x), ref(x)
    for k in PAPER_PAIRS:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


def test_clip_prompt_embeddings_are_cached_per_weights_and_prompts(tiny_clip, tmp_path, monkeypatch):
    """The second annotator over the same checkpoint file and prompts loads the class embeddings from
    the disk cache (no text encoding) and they are identical; other prompts or other weights miss."""
    from annotators.clip import ClipAnnotator

    monkeypatch.setenv("HSPACE_CACHE", str(tmp_path / "cache"))
    model, tok, ckpt = tiny_clip
    options = {"model": TINY_CLIP, "pretrained": str(ckpt), "prompts": "celeba40"}
    calls = []
    encode = ClipAnnotator.encode_texts
    monkeypatch.setattr(ClipAnnotator, "encode_texts", lambda self, texts: calls.append(len(texts)) or encode(self, texts))
    first = build_annotator("clip", options)
    assert calls == [sum(len(p) for pair in first.prompts.values() for p in pair.values()) * len(first.templates)]
    assert len(list((tmp_path / "cache" / "clip-text").glob("*.safetensors"))) == 1
    second = build_annotator("clip", options)
    assert len(calls) == 1  # a hit: nothing encoded
    assert torch.equal(second.text_features, first.text_features)
    ref = ClipAnnotator.from_model(model, tok, prompts="celeba40")  # in memory: no identity, never cached
    assert len(calls) == 2 and torch.equal(ref.text_features, first.text_features)
    build_annotator("clip", {**options, "templates": ["{}"]})  # another prompt list misses
    assert len(calls) == 3
    other = tmp_path / "other.pt"  # other weights (same size) miss
    torch.save({k: v + 1e-3 if v.is_floating_point() else v for k, v in model.state_dict().items()}, other)
    build_annotator("clip", {**options, "pretrained": str(other)})
    assert len(calls) == 4 and len(list((tmp_path / "cache" / "clip-text").glob("*.safetensors"))) == 3
    monkeypatch.setenv("HSPACE_CACHE", "off")
    build_annotator("clip", options)
    assert len(calls) == 5


def test_clip_weight_errors_are_clear(tiny_clip, tmp_path, monkeypatch):
    missing = tmp_path / "weights" / "open_clip_pytorch_model.bin"
    with pytest.raises(ModelLoadError) as e:
        build_annotator("clip", {"pretrained": str(missing)})
    assert str(missing) in str(e.value) and "annotate.options.clip.pretrained" in str(e.value)

    # a pretrained tag that is not in the (empty) HF cache, offline: one clear message, no download attempt
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        build_annotator("clip", {"model": "ViT-B-32", "pretrained": "openai", "cache_dir": str(tmp_path)})
    msg = str(e.value)
    for part in ("ViT-B-32", "'openai'", "offline", "annotate.options.clip.pretrained", "HF_HUB_OFFLINE=1"):
        assert part in msg
    with pytest.raises(ModelLoadError, match="hf-hub:org/none"):
        build_annotator("clip", {"pretrained": "hf-hub:org/none", "cache_dir": str(tmp_path)})

    bad = tmp_path / "bad.pt"
    torch.save({"foo.weight": torch.zeros(2)}, bad)
    with pytest.raises(ModelLoadError, match="cannot load checkpoint"):
        build_annotator("clip", {"model": TINY_CLIP, "pretrained": str(bad)})
    with pytest.raises(ConfigError, match="neither a pretrained tag"):
        build_annotator("clip", {"pretrained": "no_such_tag"})
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        build_annotator("clip", {"model": "ViT-Nope", "pretrained": "openai"})


# ------------------------------------------------------------------------------------ face_pose

FACE_KEYS = (["face_prob", "face_x0", "face_y0", "face_x1", "face_y1"]
             + [f"lm_{n}_{a}" for n in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right") for a in "xy"]
             + ["yaw", "pitch", "roll"])


#: MTCNN's box and landmarks on the full 512x512 astronaut photo, mapped into the crop
#: rows 10:250, columns 110:340 and normalised by the crop's size.
ASTRONAUT_CROP_GEOMETRY = {
    "face_x0": 0.309, "face_y0": 0.217, "face_x1": 0.686, "face_y1": 0.675,
    "lm_left_eye_x": 0.413, "lm_left_eye_y": 0.382, "lm_right_eye_x": 0.595, "lm_right_eye_y": 0.391,
    "lm_nose_x": 0.499, "lm_nose_y": 0.496, "lm_mouth_left_x": 0.399, "lm_mouth_left_y": 0.539,
    "lm_mouth_right_x": 0.588, "lm_mouth_right_y": 0.549,
}


def _rotate(img: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate the content clockwise (as displayed) by ``degrees`` about the centre."""
    t = math.radians(-degrees)  # affine_grid maps output -> input coordinates
    theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]])[None]
    grid = F.affine_grid(theta, (1, *img.shape), align_corners=False)
    return F.grid_sample(img[None], grid, align_corners=False, padding_mode="border")[0]


def _shift_nose(img: torch.Tensor, shift: float, centre=(0.50, 0.50), sigma: float = 0.073) -> torch.Tensor:
    """Move the content around ``centre`` (the nose tip, normalised x, y) right by ``shift``
    (fraction of the width) with a smooth Gaussian displacement; eyes and mouth barely move."""
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    bump = torch.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma ** 2))
    grid = torch.stack([(xs - shift * bump) * 2 - 1, ys * 2 - 1], dim=-1)[None]
    return F.grid_sample(img[None], grid, mode="bilinear", align_corners=True)[0]


@pytest.fixture(scope="module")
def astronaut_scores():
    """Scores of one batch: the astronaut's face crop, its nose-shifted (turned) and rotated
    variants, each followed by its mirror image, and a blank grey image."""
    from skimage import data

    full = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    face = F.interpolate(full[None, :, 10:250, 110:340], size=(192, 192), mode="bilinear", antialias=True)[0]
    variants = {"plain": face, "turned": _shift_nose(face, 0.073), "rotated": _rotate(face, 15.0)}
    batch = []
    for img in variants.values():
        batch += [img, img.flip(-1)]
    batch.append(torch.zeros_like(face))
    a = build_annotator("face_pose")
    out = a(torch.stack(batch))
    rows = {}
    for i, name in enumerate(variants):
        rows[name] = {k: float(v[2 * i]) for k, v in out.items()}
        rows[name + "_mirror"] = {k: float(v[2 * i + 1]) for k, v in out.items()}
    rows["grey"] = {k: float(v[-1]) for k, v in out.items()}
    # a small, non-square image: upsampled so that its shorter side is 160 px before detection
    seen = []
    detect = a.mtcnn.detect
    a.mtcnn.detect = lambda imgs, **kw: seen.append(tuple(imgs.shape)) or detect(imgs, **kw)
    small = F.interpolate(full[None, :, 10:250, 110:340], size=(48, 40), mode="bilinear", antialias=True)
    rows["small"] = {k: float(v[0]) for k, v in a(small).items()}
    assert seen == [(1, 192, 160, 3)]
    return out, rows


def test_face_pose_finds_the_face(astronaut_scores):
    out, rows = astronaut_scores
    assert list(out) == FACE_KEYS
    assert all(v.shape == (7,) and v.dtype == torch.float32 for v in out.values())
    r = rows["plain"]
    assert r["face_prob"] > 0.9
    assert 0 <= r["face_x0"] < r["face_x1"] <= 1 and 0 <= r["face_y0"] < r["face_y1"] <= 1
    for n in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right"):  # landmarks inside the box
        assert r["face_x0"] < r[f"lm_{n}_x"] < r["face_x1"] and r["face_y0"] < r[f"lm_{n}_y"] < r["face_y1"]
    assert r["lm_left_eye_x"] < r["lm_nose_x"] < r["lm_right_eye_x"]  # image-side order
    assert r["lm_mouth_left_x"] < r["lm_mouth_right_x"]
    assert max(r["lm_left_eye_y"], r["lm_right_eye_y"]) < r["lm_nose_y"] < min(r["lm_mouth_left_y"], r["lm_mouth_right_y"])
    assert abs(r["yaw"]) < 10 and abs(r["roll"]) < 10  # a near-frontal, upright portrait
    # normalised geometry agrees with MTCNN on the full-resolution photo (mapped into the crop),
    # also for a small non-square version of the crop (x is divided by the width, y by the height)
    for row, tol in ((r, 0.02), (rows["small"], 0.04)):
        assert row["face_prob"] > 0.9
        for k, want in ASTRONAUT_CROP_GEOMETRY.items():
            assert abs(row[k] - want) < tol, k


def test_face_pose_mirror_equivariance(astronaut_scores):
    _, rows = astronaut_scores
    swap = {"left_eye": "right_eye", "right_eye": "left_eye", "nose": "nose",
            "mouth_left": "mouth_right", "mouth_right": "mouth_left"}
    for name in ("plain", "turned", "rotated"):
        r, m = rows[name], rows[name + "_mirror"]
        assert m["face_prob"] > 0.9
        assert abs(m["face_x0"] - (1 - r["face_x1"])) < 0.02 and abs(m["face_x1"] - (1 - r["face_x0"])) < 0.02
        assert abs(m["face_y0"] - r["face_y0"]) < 0.02 and abs(m["face_y1"] - r["face_y1"]) < 0.02
        for n, n_m in swap.items():
            assert abs(m[f"lm_{n_m}_x"] - (1 - r[f"lm_{n}_x"])) < 0.02, (name, n)
            assert abs(m[f"lm_{n_m}_y"] - r[f"lm_{n}_y"]) < 0.02, (name, n)
        assert abs(m["pitch"] - r["pitch"]) < 5, name
        assert abs(m["yaw"] + r["yaw"]) < 8, name
        assert abs(m["roll"] + r["roll"]) < 4, name
    # with a clearly turned / rotated face the signs flip
    assert rows["turned"]["yaw"] > 8 and rows["turned_mirror"]["yaw"] < -8
    assert rows["rotated"]["roll"] > 8 and rows["rotated_mirror"]["roll"] < -8


def test_face_pose_sign_conventions_on_the_photo(astronaut_scores):
    _, rows = astronaut_scores
    # nose moved towards the image's right: the face turns right, yaw grows
    assert rows["turned"]["yaw"] - rows["plain"]["yaw"] > 8
    # content rotated 15 degrees clockwise: roll grows by about 15
    assert abs(rows["rotated"]["roll"] - rows["plain"]["roll"] - 15) < 4


def test_face_pose_no_face(astronaut_scores):
    _, rows = astronaut_scores
    g = rows["grey"]
    assert g["face_prob"] == 0.0
    assert all(math.isnan(g[k]) for k in FACE_KEYS[1:])


def test_pose_from_landmarks_conventions():
    from annotators.face_pose import MODEL_POINTS, pose_from_landmarks

    frontal = MODEL_POINTS[:, :2] * 40 + [100, 60]  # an upright frontal face, 40 px between the eyes
    np.testing.assert_allclose(pose_from_landmarks(frontal), (0, 0, 0), atol=1e-6)
    right = frontal.copy()
    right[2, 0] += 6  # nose towards the image's right
    yaw, pitch, roll = pose_from_landmarks(right)
    assert yaw > 10 and abs(pitch) < 1 and abs(roll) < 1
    up = frontal.copy()
    up[2, 1] -= 6  # nose up towards the eye line: chin up
    yaw, pitch, roll = pose_from_landmarks(up)
    assert pitch > 10 and abs(yaw) < 1 and abs(roll) < 1
    t = math.radians(20)  # clockwise as displayed (y points down)
    rot = (frontal - frontal.mean(0)) @ np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]]) + 50
    np.testing.assert_allclose(pose_from_landmarks(rot), (0, 0, 20), atol=1e-6)
    # mirroring (x -> -x, left/right labels swapped) flips yaw and roll, keeps pitch, exactly
    pts = right.copy()
    pts[:, 1] += np.array([0, 3, -2, 1, 0])
    mirrored = pts[[1, 0, 2, 4, 3]] * [-1, 1]
    y, p, r = pose_from_landmarks(pts)
    ym, pm, rm = pose_from_landmarks(mirrored)
    np.testing.assert_allclose((ym, pm, rm), (-y, p, -r), atol=1e-6)


# ---------------------------------------------------------------------------- celeba / hopenet

def _calibrated(net: nn.Module) -> nn.Module:
    """Random weights with BatchNorm running statistics taken from a random batch, so eval-mode
    outputs are moderate (default statistics saturate a random ResNet-50)."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 64, 64) * 2 - 1)
    return net.eval()


def _resize(x, size):
    return F.interpolate((x + 1) / 2, size=size, mode="bilinear", antialias=True, align_corners=False)


def _celeba_reference(net, x):
    return torch.softmax(net(_resize(x, (256, 256)) * 2 - 1).view(len(x), 40, 2), dim=-1)[..., 1].T  # (40, B)


def _hopenet_reference(net, x):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    bins = torch.arange(66, dtype=torch.float32)
    return torch.stack([(torch.softmax(v, -1) * bins).sum(-1) * 3 - 99 for v in net((_resize(x, (224, 224)) - mean) / std)])


@pytest.mark.parametrize("name", ["celeba", "hopenet"])
def test_classifier_from_checkpoint_runs_in_eval_mode(name, tmp_path):
    from annotators.celeba import Hopenet, celeba_resnet50

    if name == "celeba":
        net, names, reference = _calibrated(celeba_resnet50()), CELEBA_NAMES, _celeba_reference
        # wrapped under "state_dict" with DataParallel's "module." prefix
        ckpt = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    else:
        net, names, reference = _calibrated(Hopenet()), ["yaw", "pitch", "roll"], _hopenet_reference
        ckpt = {k: v for k, v in net.state_dict().items() if not k.startswith("fc_finetune.")}  # vestigial, optional
    path = tmp_path / f"{name}.pt"
    torch.save(ckpt, path)
    a = build_annotator(name, {"checkpoint": str(path)})

    grad_enabled = []
    a.net.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    a.net.train()  # a classifier left in training mode: __call__ must still score in eval mode
    torch.manual_seed(5)
    x = torch.rand(3, 3, 96, 96) * 2 - 1
    batch = a(x)
    alone = a(x[:1])
    assert not a.net.training and grad_enabled == [False, False]
    assert list(batch) == names
    for k, v in batch.items():
        assert v.shape == (3,) and v.dtype == torch.float32 and not v.requires_grad
        assert torch.isfinite(v).all()
        # BatchNorm in eval mode: an image's score does not depend on the rest of its batch
        torch.testing.assert_close(alone[k], v[:1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        want = reference(net, x[:1])
    torch.testing.assert_close(torch.stack([alone[k] for k in names]), want, atol=1e-4, rtol=1e-4)
    values = torch.stack(list(batch.values()))
    if name == "celeba":
        assert ((values >= 0) & (values <= 1)).all()
        assert ((values > 0.01) & (values < 0.99)).any()  # not saturated, so the comparisons above bite
    else:
        assert ((values >= -99) & (values <= 96)).all()
        assert values.std() > 0.1


def test_classifier_checkpoint_errors(tmp_path):
    from torchvision.models import resnet50

    missing = tmp_path / "nowhere" / "attribute_predictor.pt"
    with pytest.raises(ModelLoadError) as e:
        build_annotator("celeba", {"checkpoint": str(missing)})
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "annotate.options.celeba.checkpoint" in msg and "attribute_predictor.pt" in msg
    with pytest.raises(ModelLoadError, match="annotate.options.hopenet.checkpoint"):
        build_annotator("hopenet", {})

    wrong = tmp_path / "wrong.pt"
    torch.save({"foo.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ModelLoadError) as e:
        build_annotator("hopenet", {"checkpoint": str(wrong)})
    assert "missing keys" in str(e.value) and "unexpected keys ['foo.weight']" in str(e.value)

    forty = tmp_path / "forty.pt"  # a plain 40-logit ResNet-50: the right keys, the wrong fc shape
    torch.save(resnet50(num_classes=40).state_dict(), forty)
    with pytest.raises(ModelLoadError, match=r"shape mismatches .*fc\.weight"):
        build_annotator("celeba", {"checkpoint": str(forty)})

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read"):
        build_annotator("celeba", {"checkpoint": str(garbage)})


@pytest.mark.parametrize("name", ["toy", "clip"])
def test_scores_are_float32_measurements_under_any_autocast(name, tiny_clip):
    """Under a bf16-mixed Trainer's autocast an annotator still scores in float32: the same scores as
    without it (the toy annotator's numpy conversion failed on bfloat16 before)."""
    options = {"model": TINY_CLIP, "pretrained": str(tiny_clip[2]), "prompts": "paper"} if name == "clip" else {}
    a = build_annotator(name, options)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = a(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = a(images)
    for k in plain:
        assert mixed[k].dtype == torch.float32
        torch.testing.assert_close(mixed[k], plain[k], rtol=0, atol=0)
