"""The toy-faces domain: renderer, shipped annotator, DDPM training reproducibility."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from annotators.base import build_annotator
from pipeline.formats.images import from_uint8
from toyfaces.annotator import evaluate_annotator
from toyfaces.render import FACTORS, correlation_matrix, render_face, render_faces, sample_factors


def test_factors_have_their_documented_ranges_and_rates():
    f = sample_factors(20000, 0)
    assert set(f) == {x.name for x in FACTORS}
    for x in FACTORS:
        v = f[x.name]
        if x.kind == "continuous":
            assert v.min() >= x.low and v.max() <= x.high
            assert abs(v.std() - x.std) < 0.02 * (x.high - x.low)
        elif x.kind == "binary":
            assert set(np.unique(v)) == {0.0, 1.0} and abs(v.mean() - x.p) < 0.015
        else:
            assert set(np.unique(v)) == set(range(x.levels))
    names = [x.name for x in FACTORS]
    c = np.corrcoef(np.stack([f[n] for n in names]))
    assert np.abs(c - np.eye(len(names))).max() < 0.03  # independent by default
    assert all(np.array_equal(sample_factors(5, 3)[k], v) for k, v in sample_factors(5, 3).items())


def test_correlated_pairs_and_bad_correlations():
    f = sample_factors(20000, 1, {"glasses~hair": 0.6, "smile~eye_open": -0.5})
    assert np.corrcoef(f["glasses"], f["hair"])[0, 1] > 0.4
    assert np.corrcoef(f["smile"], f["eye_open"])[0, 1] < -0.4
    assert abs(np.corrcoef(f["glasses"], f["smile"])[0, 1]) < 0.03
    assert abs(f["glasses"].mean() - 0.4) < 0.015  # marginals unchanged
    with pytest.raises(ValueError, match="two different factors"):
        correlation_matrix({"hair~hair": 0.5})
    with pytest.raises(KeyError, match="unknown toy-face factor"):
        correlation_matrix({"hair~beard": 0.5})
    with pytest.raises(ValueError, match="valid correlation matrix"):
        correlation_matrix({"hair~smile": 0.9, "hair~yaw": 0.9, "smile~yaw": -0.9})


def test_renders_change_with_their_factors():
    base = render_face()
    assert base.shape == (32, 32, 3) and base.dtype == np.uint8
    for name, value in (("smile", 1.0), ("eye_open", 0.0), ("glasses", 1), ("hat", 1), ("yaw", 1.0), ("hair", 1.0)):
        assert np.abs(render_face(**{name: value}).astype(int) - base).mean() > 1.0, name
    # the hat sits at the top, the mouth in the lower third
    assert np.abs(render_face(hat=1).astype(int) - base)[16:].mean() < 0.5
    assert np.abs(render_face(smile=1.0).astype(int) - base)[:18].mean() < 0.5


def test_shipped_annotator_reads_fresh_renders():
    annotator = build_annotator("toy")
    metrics = evaluate_annotator(annotator, n=384, seed=777)
    for k, v in metrics.items():
        assert v >= (0.95 if k.endswith("_r2") else 0.97), (k, v)


def test_annotator_runs_in_eval_mode_whatever_the_batch():
    annotator = build_annotator("toy")
    annotator.net.train()  # __call__ must put it back in eval mode
    x = from_uint8(render_faces(sample_factors(9, 5)))
    alone = annotator(x[:1])
    batch = annotator(x)
    for k in alone:
        torch.testing.assert_close(alone[k], batch[k][:1], atol=1e-5, rtol=1e-5)
    assert not annotator.net.training


def test_consistency_score_separates_faces_from_damage():
    cons = build_annotator("toy_consistency")
    faces = from_uint8(render_faces(sample_factors(16, 9)))
    noisy = (faces + 0.6 * torch.randn(faces.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    clean, bad = cons(faces)["render_error"], cons(noisy)["render_error"]
    assert clean.mean() < 0.03 and bad.mean() > 3 * clean.mean()


def _tiny_train_cfg(out, steps, **kw):
    from pipeline.config import ToyTrainConfig

    tiny = dict(batch_size=4, block_out_channels=[32, 32], layers_per_block=1, warmup_steps=2,
                checkpoint_every=2, sample_every=1000)
    return ToyTrainConfig(out_dir=str(out), steps=steps, **(tiny | kw))


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("skip_dropout", [0.0, 0.5])
def test_training_is_reproducible_and_resumes_exactly(tmp_path, skip_dropout):
    from toyfaces.train_ddpm import train_toy

    straight = train_toy(_tiny_train_cfg(tmp_path / "a", 4, skip_dropout=skip_dropout))
    train_toy(_tiny_train_cfg(tmp_path / "b", 2, skip_dropout=skip_dropout))
    resumed = train_toy(_tiny_train_cfg(tmp_path / "b", 4, skip_dropout=skip_dropout))  # picks up the step-2 checkpoint
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "scheduler_config.json").exists() and (straight / "model_index.json").exists()
    from pipeline import HSpaceModel

    m = HSpaceModel.from_pretrained(str(straight), num_inference_steps=2, device="cpu")
    assert m.h_shape == (32, 16, 16)  # two levels: one downsampling of the 32x32 input
    assert not any(b._forward_hooks for b in m.unet.down_blocks), "the saved model is a plain UNet2DModel"


def test_skip_dropout_zeroes_the_skips_of_masked_samples_only():
    """Masked samples reach the up blocks with every down-block skip zero (the conv_in skip
    stays); unmasked ones, and every sample once the mask is cleared, run the plain U-Net."""
    from conftest import make_tiny_unet
    from toyfaces.train_ddpm import SkipDropout

    unet = make_tiny_unet(size=32)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    with torch.no_grad():
        plain = unet(x, t).sample
        seen = []
        grab = [u.register_forward_pre_hook(lambda m, a: seen.append(a[1])) for u in unet.up_blocks]
        dropout = SkipDropout(unet)
        dropout.mask = torch.tensor([True, False])  # keep sample 0's skips, drop sample 1's
        dropped = unet(x, t).sample
        dropout.mask = None
        cleared = unet(x, t).sample
    for g in grab:
        g.remove()
    groups = seen[:len(unet.up_blocks)]
    conv_in_skip = groups[-1][0]  # the first entry of the down path reaches the last up block first
    skips = [s for group in groups for s in group]
    assert len(skips) == 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)
    down_skips = [s for s in skips if s is not conv_in_skip]
    assert all(float(s[1].abs().max()) == 0 for s in down_skips) and float(conv_in_skip[1].abs().max()) > 0
    assert all(float(s[0].abs().max()) > 0 for s in skips)
    torch.testing.assert_close(dropped[0], plain[0])
    assert (dropped[1] - plain[1]).abs().max() > 1e-3
    torch.testing.assert_close(cleared, plain, rtol=0, atol=0)
    dropout.remove()
    assert not any(b._forward_hooks for b in unet.down_blocks)


@pytest.mark.slow
def test_init_from_starts_from_an_exported_model_and_rejects_a_wrong_one(tmp_path):
    """Phase 2 (finetune-toy) starts from phase 1's EMA weights and resumes from its own
    checkpoint without them; a missing or differently shaped model is a ConfigError naming
    init_from, before any training."""
    from pipeline.errors import ConfigError
    from toyfaces.train_ddpm import ToyDDPM, train_toy

    first = train_toy(_tiny_train_cfg(tmp_path / "a", 2))
    module = ToyDDPM(_tiny_train_cfg(tmp_path / "b", 2, init_from=str(first), seed=5))
    saved = _weights(first)
    for name, p in module.unet.state_dict().items():
        assert torch.equal(p, saved[name].float()), name
    assert module.ema.state_dict().keys() == module.unet.state_dict().keys()
    # phase 2 resumes from its own checkpoint even after phase 1's model is gone
    straight = train_toy(_tiny_train_cfg(tmp_path / "d", 4, init_from=str(first), seed=5, skip_dropout=0.5))
    train_toy(_tiny_train_cfg(tmp_path / "e", 2, init_from=str(first), seed=5, skip_dropout=0.5))
    import shutil

    moved = shutil.move(str(first), str(tmp_path / "moved"))
    resumed = train_toy(_tiny_train_cfg(tmp_path / "e", 4, init_from=str(first), seed=5, skip_dropout=0.5))
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.move(moved, str(first))
    with pytest.raises(ConfigError, match="init_from=.*no exported model"):
        ToyDDPM(_tiny_train_cfg(tmp_path / "c", 2, init_from=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="init_from=.*another architecture"):
        ToyDDPM(_tiny_train_cfg(tmp_path / "c", 2, init_from=str(first), layers_per_block=2))
    with pytest.raises(ConfigError, match="init_from="):
        train_toy(_tiny_train_cfg(tmp_path / "f", 2, init_from=str(tmp_path / "nowhere")))
    assert not (tmp_path / "f").exists(), "a refused run writes nothing"


@pytest.mark.slow
def test_validate_toy_runs_and_writes_json():
    """The validation's arithmetic end to end on a tiny model (its figures are meaningless here;
    the shipped model's are in docs/toyfaces.md): every section present, JSON-serialisable."""
    import json

    from diffusers import DDIMScheduler

    from conftest import make_tiny_unet
    from pipeline import HSpaceModel
    from toyfaces.annotator import ToyFaceAnnotator
    from toyfaces.validate import validate

    model = HSpaceModel(make_tiny_unet(size=32), DDIMScheduler(), num_inference_steps=3)
    r = validate(model, ToyFaceAnnotator(), n_samples=8, n_edit=2, n_top=2)
    assert set(r) == {"factors", "correlations", "hf_energy", "editability", "inversion", "settings"}
    assert set(r["inversion"]) == {"fixed_point_iterations=0", "fixed_point_iterations=1"}
    json.dumps(r)


def test_correlation_statistics_finds_a_lost_entanglement():
    """Renders that correlate glasses with hair against 'samples' that do not: the renders' r
    falls outside the samples' interval (not reproduced); samples drawn like the renders
    reproduce it. The interval is Fisher's: r = 0.5 at N = 403 gives tanh(atanh(0.5) -+ 1.96/20)."""
    from toyfaces.validate import correlation_statistics, pearson_interval

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g)
    renders = {"glasses": x, "hair": 0.6 * x + 0.8 * torch.randn(4000, generator=g)}
    lost = {"glasses": torch.randn(500, generator=g), "hair": torch.randn(500, generator=g)}
    kept = {k: v[:500] for k, v in renders.items()}
    r = correlation_statistics(lost, renders, {"glasses~hair": 0.4})["glasses~hair"]
    assert abs(r["r_renders"] - 0.6) < 0.03 and abs(r["r_samples"]) < 0.1 and r["ok"] is False
    assert correlation_statistics(kept, renders, {"glasses ~ hair": 0.4})["glasses ~ hair"]["ok"] is True
    y = 0.5 * x[:403] + (0.75 ** 0.5) * torch.randn(403, generator=g)
    r, low, high = pearson_interval(x[:403], y)
    assert low < r < high
    assert low == pytest.approx(np.tanh(np.arctanh(r) - 1.959964 / 20), abs=1e-6)
    assert high == pytest.approx(np.tanh(np.arctanh(r) + 1.959964 / 20), abs=1e-6)


def test_validate_toy_takes_the_correlations_the_model_was_trained_with(tmp_path):
    """The model's training.json, not the configuration's train_toy section, says what the
    samples should reproduce; a model without one falls back to train_toy.correlations."""
    import json

    from pipeline.config import load_config
    from pipeline.errors import ModelLoadError
    from toyfaces.validate import training_correlations

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "training.json").write_text(json.dumps({"config": {"correlations": {"smile~yaw": -0.3}}}))
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'm'}"])
    assert training_correlations(cfg) == {"smile~yaw": -0.3}
    (tmp_path / "bare").mkdir()
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'bare'}", "train_toy.correlations={hat~hair: 0.2}"])
    assert training_correlations(cfg) == {"hat~hair": 0.2}
    assert training_correlations(load_config(None, ["model.name_or_path=toyfaces"])) == {"glasses~hair": 0.4}
    (tmp_path / "m" / "training.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="training.json is not a train-toy training record"):
        training_correlations(load_config(None, [f"model.name_or_path={tmp_path / 'm'}"]))


def test_out_of_range_factors_are_drawn_as_the_nearest_valid_face():
    """A reader's estimate of an edited face can leave the range (eye_open -0.3 once crashed
    the evaluate stage's re-rendering); it is clamped, not an error."""
    wild = render_face(smile=1.4, eye_open=-0.3, yaw=-1.2, hair=1.1, background=5.0)
    edge = render_face(smile=1.0, eye_open=0.0, yaw=-1.0, hair=1.0, background=3)
    np.testing.assert_array_equal(wild, edge)
