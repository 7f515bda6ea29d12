"""`hspace explore`: the session logic against the Python API, bad input, and the app in a real browser.

The run directory is built here from a few samples of the embedded default: a supervised file of
two mean-difference directions (smile, hat: top 2 minus bottom 2 of 8 samples by the toy
annotator's reading) and a "pca" file of three directions (pc1..pc3).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from annotators.base import build_annotator
from pipeline import Edit, HSpaceModel
from pipeline.errors import DatasetError, InputError
from pipeline.explore.session import ExploreSession, Slider
from pipeline.formats.directions import Directions, compose, load_directions, save_directions
from pipeline.formats.images import save_png, to_uint8

REPO = Path(__file__).resolve().parents[1]
T = 20


@pytest.fixture(scope="module")
def model():
    return HSpaceModel.from_pretrained("toyfaces", num_inference_steps=T, device="cpu")


@pytest.fixture(scope="module")
def toy():
    return build_annotator("toy")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model, toy):
    """<run>/directions/{supervised,pca}.safetensors from 8 samples of the embedded default."""
    run = tmp_path_factory.mktemp("explore-run")
    out = model.sample(seeds=list(range(8)))
    h, scores = out.h.float(), toy(out.images)

    def mean_difference(attr):
        order = torch.argsort(scores[attr])
        return h[order[-2:]].mean(0) - h[order[:2]].mean(0)

    ts = model.timesteps.tolist()
    save_directions(Directions(torch.stack([mean_difference("smile"), mean_difference("hat")]), ["smile", "hat"],
                               "supervised/mean_difference", ts, params={"scales": [-3.0, 0.0, 3.0]}),
                    run / "directions" / "supervised.safetensors")
    centred = h - h.mean(0)
    pcs = torch.stack([centred[i] / centred[i].flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 10 for i in range(3)])
    save_directions(Directions(pcs, ["pc1", "pc2", "pc3"], "pca/per-step", ts, params={"scales": [-4.0, 4.0]}),
                    run / "directions" / "pca.safetensors")
    return run


@pytest.fixture
def session(run_dir, model, toy, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    return ExploreSession(model, run, toy, fixed_point_iterations=1)


def readings(toy, images):
    return {k: float(v[0]) for k, v in toy(images).items()}


# ---------------------------------------------------------------------- the session against the Python API
@pytest.mark.parametrize("asyrp, window, eta", [(False, None, None), (True, (5, 12), None), (False, (8, 19), 1.0)])
def test_update_equals_sample_and_annotator(session, model, toy, asyrp, window, eta):
    """What an update shows is HSpaceModel.sample of the composed edit (same seed, steps, Asyrp, eta)
    read by the annotator; the unedited image is the plain sample."""
    sliders = [Slider("supervised", 0, 2.0), Slider("pca", 2, -1.5), Slider("supervised", 1, 0.0)]
    view = session.render(7, sliders, asyrp=asyrp, window=window, eta=eta)
    delta = compose([session.direction("supervised", 0), session.direction("pca", 2)], [2.0, -1.5])
    steps = None if window is None else range(window[0], window[1] + 1)
    ref = model.sample([7], Edit(delta=delta, steps=steps, asyrp=asyrp), eta=eta)
    plain = model.sample([7], eta=eta)
    assert torch.allclose(view.edited_tensor, ref.images[0], atol=1e-5)
    np.testing.assert_array_equal(view.original, to_uint8(plain.images[0]))
    assert not np.array_equal(view.original, view.edited)
    expected_edit, expected_plain = readings(toy, ref.images), readings(toy, plain.images)
    assert set(view.scores) == set(toy.attributes)
    for attr, r in view.scores.items():
        assert r.unedited == pytest.approx(expected_plain[attr], abs=1e-5)
        assert r.edited == pytest.approx(expected_edit[attr], abs=1e-5)


def test_zero_sliders_show_the_plain_sample_twice(session, model):
    view = session.render(3, [Slider("supervised", 0, 0.0)])
    np.testing.assert_array_equal(view.edited, view.original)
    np.testing.assert_array_equal(view.original, to_uint8(model.sample([3]).images[0]))


def test_resuming_a_trajectory_equals_running_it_whole(model):
    """start_step: the latent entering step i of an earlier run, edited from i on, equals the whole run
    (to the float32 rounding of the stored latent)."""
    delta = 0.3 * model.sample([1]).h[0].float()
    base = model.sample([2], return_latents=True, eta=0.5)
    whole = model.sample([2], Edit(delta=delta, steps=range(6, T)), eta=0.5)
    resumed = model.sample([2], Edit(delta=delta, steps=range(6, T)), x_T=base.latents[:, 6], eta=0.5, start_step=6)
    # equal but for the float32 rounding of the cached latent (the sampler's own state is float64)
    assert torch.allclose(resumed.images, whole.images, atol=1e-5)
    assert torch.isnan(resumed.h[:, :6].float()).all() and torch.allclose(resumed.h[:, 6:], whole.h[:, 6:], atol=1e-4)
    with pytest.raises(InputError, match="needs x_T"):
        model.sample([2], start_step=3)


def test_uploaded_image_is_inverted_with_the_runs_settings(session, model, toy, tmp_path):
    face = to_uint8(model.sample([11]).images[0])
    path = save_png(face, tmp_path / "face.png")
    key = session.add_image(path)
    x = torch.from_numpy(face).permute(2, 0, 1)[None].float() / 127.5 - 1
    inv = model.invert(x, fixed_point_iterations=1)
    assert torch.equal(model.invert(x.contiguous(), fixed_point_iterations=1).x_T, inv.x_T)  # any memory layout
    delta = 2.0 * session.direction("supervised", 1)
    view = session.render(key, [Slider("supervised", 1, 2.0)])
    ref = model.sample(edit=Edit(delta=delta), x_T=inv.x_T)
    np.testing.assert_array_equal(view.original, to_uint8(model.sample(x_T=inv.x_T).images[0]))
    assert torch.allclose(view.edited_tensor, ref.images[0], atol=1e-5)
    assert view.scores["hat"].edited == pytest.approx(readings(toy, ref.images)["hat"], abs=1e-5)
    # the upload as the model sees it, and how far the inversion lands from it
    np.testing.assert_array_equal(view.source_image, face)
    recon = model.sample(x_T=inv.x_T).images
    assert view.inversion_error == pytest.approx(float((recon - x).abs().mean() / 2), abs=1e-6)
    assert session.render(0).source_image is None  # a seed has none
    # at eta > 0: the edit-friendly inversion, its noise from the seed given
    inv = model.invert_ddpm(x, [5], eta=1.0)
    view = session.render(key, [Slider("supervised", 1, 2.0)], eta=1.0, seed=5)
    ref = model.sample(edit=Edit(delta=delta), x_T=inv.x_T, noise=inv.noise, eta=1.0)
    assert torch.allclose(view.edited_tensor, ref.images[0], atol=1e-5)


def test_naming_saves_a_label_and_keeps_index_names_and_tensors(session, run_dir, model, toy):
    path = session.run_dir / "directions" / "pca.safetensors"
    before = load_directions(path)
    assert session.name_direction("pca", 2, "  hat ") == "pc3: hat"
    after = load_directions(path)
    assert after.labels == {2: "hat"} and after.names == before.names
    assert torch.equal(after.directions, before.directions) and after.params == before.params
    assert after.index("hat") == 2 and after.display_name(2) == "pc3: hat"
    assert not list(path.parent.glob(".*tmp"))
    later = ExploreSession(model, session.run_dir, toy)                # a later session shows it
    assert ("pca / pc3: hat", ("pca", 2)) in later.choices()
    from pipeline.stages.report import strip_captions  # and the report's edit strips

    assert strip_captions(path.parent, "pca") == {"pc3": "pc3: hat"}
    assert session.name_direction("pca", 2, "") == "pc3"               # an empty name removes it
    assert load_directions(path).labels == {}
    with pytest.raises(InputError, match="another direction"):
        session.name_direction("pca", 0, "pc2")


def test_labels_survive_subset_and_show_in_edit_titles(session):
    d = load_directions(session.run_dir / "directions" / "pca.safetensors")
    d.labels[1] = "smile-ish"
    sub = d.subset(["pc2", "pc3"])
    assert sub.labels == {0: "smile-ish"} and sub.display_name(0) == "pc2: smile-ish"


def test_export_combination_is_a_delta_h_that_reproduces_the_edit(session, model):
    sliders = [Slider("supervised", 0, 1.5), Slider("pca", 0, 2.0)]
    view = session.render(4, sliders, window=(3, 15))
    path = session.export_directions("smile_and_pc1", sliders, window=(3, 15))
    d = load_directions(path)
    assert d.method == "explore/combination" and d.params["steps"] == [3, 15]
    assert [c["name"] for c in d.params["components"]] == ["smile", "pc1"]
    assert d.directions[0, :3].abs().max() == 0 and d.directions[0, 16:].abs().max() == 0
    again = model.sample([4], Edit(delta=d.get(0)))
    assert torch.allclose(again.images[0], view.edited_tensor, atol=1e-5)
    assert ("smile_and_pc1", 0) in [c[1] for c in session.choices()]  # offered on the sliders at once
    session.export_directions("smile_and_pc1", [Slider("supervised", 0, 1.0)])  # its own file: overwritten
    with pytest.raises(InputError, match="not written by explore"):
        session.export_directions("pca", sliders)
    with pytest.raises(InputError, match="every slider is at 0"):
        session.export_directions("zero", [Slider("pca", 0, 0.0)])
    out = session.export_png(view)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), view.edited)


def test_one_slider_range_rule(session, model, toy):
    """Twice the calibrated strength, else the file's largest suggested scale, else 3; rounded up to two
    significant digits; the same for every direction of a file however the slider was bound."""
    from pipeline.explore.session import round_up

    assert session.slider_range("supervised", 0) == session.slider_range("supervised", 1) == 3.0  # scales [-3, 0, 3]
    assert session.slider_range("pca", 2) == 4.0
    d = load_directions(session.run_dir / "directions" / "supervised.safetensors")
    d.params["calibration"] = {"scales": {"smile": 0.8660254, "hat": None}}
    save_directions(d, session.run_dir / "directions" / "supervised.safetensors")
    d.params = {}
    save_directions(d, session.run_dir / "directions" / "bare.safetensors")
    again = ExploreSession(model, session.run_dir, toy)
    assert again.slider_range("supervised", 0) == 1.8  # 2 x 0.866 = 1.73, rounded up
    assert again.slider_range("supervised", 1) == 3.0  # no calibrated strength: the file's scales
    assert again.slider_range("bare", 0) == 3.0
    assert [round_up(x) for x in (1.7320508, 612.3, 3.0, 0.0123)] == [1.8, 620.0, 3.0, 0.013]


def test_readings_in_standard_deviations_and_classes(session, model, toy):
    """The change of a reading in SD of the unedited scores (the calibration's when a file has one),
    and the toy's background as its class, not a number."""
    from pipeline.explore.app import scores_html

    view = session.render(5, [Slider("supervised", 0, 3.0)])
    assert session.stds == {}  # no calibration and no evaluation in this run: raw only
    assert view.scores["smile"].change_sd is None
    d = load_directions(session.run_dir / "directions" / "supervised.safetensors")
    d.params["calibration"] = {"std": {"smile": 0.5, "hat": 0.25}, "scales": {}}
    save_directions(d, session.run_dir / "directions" / "supervised.safetensors")
    view = ExploreSession(model, session.run_dir, toy).render(5, [Slider("supervised", 0, 3.0)])
    smile = view.scores["smile"]
    assert smile.std == 0.5 and smile.change_sd == pytest.approx((smile.edited - smile.unedited) / 0.5)
    bg = view.scores["background"]
    assert bg.classes == toy.categorical["background"] and bg.label(bg.unedited) in toy.categorical["background"]
    table = scores_html(view.scores)
    assert f'data-which="change_sd" data-value="{smile.change_sd!r}">{smile.change_sd:+.2f}</td>' in table
    assert f">{bg.label(bg.edited)}</td>" in table and "class" in table


def test_export_png_carries_how_it_was_made(session, model):
    """The edited image at the size asked for, under a new name each time in <run_dir>/explore, with
    the seed, sliders, window, Asyrp, eta and model in its PNG metadata."""
    import json

    sliders = [Slider("supervised", 0, 1.5), Slider("pca", 1, -2.0)]
    view = session.render(4, sliders, window=(2, 17), asyrp=True)
    first, second = session.export_png(view, size=128), session.export_png(view, size=128)
    assert first != second and first.parent == second.parent == session.run_dir / "explore"
    with Image.open(first) as im:
        assert im.size == (128, 128)
        np.testing.assert_array_equal(np.asarray(im)[::4, ::4], view.edited)  # nearest-neighbour x4
        meta = json.loads(im.text["hspace"])
    assert meta["seed"] == 4 and meta["source"] == 4 and meta["window"] == [2, 17] and meta["asyrp"] is True
    assert meta["model"] == str(model.name_or_path) and meta["steps"] == T and meta["size"] == 128
    assert [(c["file"], c["index"], c["name"], c["scale"]) for c in meta["sliders"]] == [
        ("supervised", 0, "smile", 1.5), ("pca", 1, "pc2", -2.0)]
    again = model.sample([4], Edit(delta=compose([session.direction("supervised", 0), session.direction("pca", 1)],
                                                 [1.5, -2.0]), steps=range(2, 18), asyrp=True))
    np.testing.assert_array_equal(view.edited, to_uint8(again.images[0]))  # the metadata remake the image


# ---------------------------------------------------------------------- bad input
def test_bad_input_is_one_clear_error(session, model, tmp_path):
    with pytest.raises(DatasetError, match="holds no directions files"):
        ExploreSession(model, tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(session.run_dir, bad)
    save_directions(Directions(torch.zeros(1, T, 64, 8, 8), ["x"], "pca/per-step", model.timesteps.tolist()),
                    bad / "directions" / "other.safetensors")
    with pytest.raises(DatasetError, match=r"holds directions of shape \(T, \*h_shape\) = \(20, 64, 8, 8\)"):
        ExploreSession(model, bad)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="notes.png is not a readable image"):
        session.add_image(text)
    assert session.render(0).edited.shape == (32, 32, 3)                # the session still works
    with pytest.raises(InputError, match="step window 9..4"):
        session.render(0, [Slider("pca", 0, 1.0)], window=(9, 4))
    with pytest.raises(InputError, match="no directions file 'nope'"):
        session.render(0, [Slider("nope", 0, 1.0)])


def hspace(*args, timeout=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=False, capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.slow  # starts hspace subprocesses
def test_cli_errors_are_one_line_exit_2(session, tmp_path):
    from pipeline.explore.app import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=f"port {port} on 127.0.0.1 is already in use"):
            free_port("127.0.0.1", port)
        r = hspace("explore", f"run_dir={session.run_dir}", "--port", str(port))
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
        assert f"port {port} on 127.0.0.1 is already in use" in r.stderr
    r = hspace("explore", f"run_dir={tmp_path / 'none'}", "--port", "0")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "holds no directions files" in r.stderr


# ---------------------------------------------------------------------- the app in a real browser
@pytest.fixture(scope="module")
def app_session(run_dir, model, toy, tmp_path_factory):
    """A copy of the run for the app of this module's browser tests, and a session on it (for lookups)."""
    run = tmp_path_factory.mktemp("explore-app") / "run"
    shutil.copytree(run_dir, run)
    return ExploreSession(model, run, toy, fixed_point_iterations=1)


@pytest.fixture(scope="module")
def app(app_session, tmp_path_factory):
    """`hspace explore` on the module's run directory, as a user starts it; yields (its URL, its log file)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path_factory.mktemp("explore-log") / "explore.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "explore", f"run_dir={app_session.run_dir}",
                                 f"model.num_inference_steps={T}", "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        while not (m := re.search(r"(http://127\.0\.0\.1:\d+/)", log.read_text())):
            if proc.poll() is not None:
                raise AssertionError("hspace explore did not start:\n" + log.read_text())
            time.sleep(0.2)
        yield m.group(1), log
    finally:
        proc.terminate()
        proc.wait()


def _shown_image(page, url, elem) -> np.ndarray:
    src = page.locator(f"#{elem} img").get_attribute("src")
    with urllib.request.urlopen(src if src.startswith("http") else url.rstrip("/") + src) as r:
        shown = np.asarray(Image.open(BytesIO(r.read())).convert("RGB"))
    return shown[::shown.shape[0] // 32, ::shown.shape[1] // 32]  # the app shows 32 px nearest-upscaled


def _score(page, attr, which) -> float:
    return float(page.locator(f'#scores td[data-attr="{attr}"][data-which="{which}"]').get_attribute("data-value"))


def _set_scale(page, k: int, value: float) -> None:
    """Type a value into slider k's box and wait for the edited image to change."""
    before = page.locator("#edited img").get_attribute("src")
    box = page.locator(f"#scale-{k} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_function("s => document.querySelector('#edited img').getAttribute('src') !== s", arg=before)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('update')")


@pytest.mark.slow
def test_browser_slider_scores_naming_upload(browser, app, app_session, model, toy, tmp_path):
    app, log = app
    session = app_session
    page = browser.new_page()
    page.set_default_timeout(600_000)  # generous: the CPU may be shared; a broken page fails instead of hanging
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(app)
    page.wait_for_selector('#scores td[data-attr="smile"][data-which="edited"]')
    plain = _shown_image(page, app, "original")
    np.testing.assert_array_equal(plain, to_uint8(model.sample([0]).images[0]))

    # slider 1 is bound to the first supervised direction (smile): move it to 2.5
    assert page.locator("#direction-0 input").input_value() == "supervised / smile"
    before_src = page.locator("#edited img").get_attribute("src")
    box = page.locator("#scale-0 input[type=number]")
    box.fill("2.5")
    box.press("Enter")
    page.wait_for_function("s => document.querySelector('#edited img').getAttribute('src') !== s", arg=before_src)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('update')")
    ref = model.sample([0], Edit(delta=2.5 * session.direction("supervised", 0)))
    edited = _shown_image(page, app, "edited")
    assert not np.array_equal(edited, plain)                            # the shown image changed ...
    np.testing.assert_array_equal(edited, to_uint8(ref.images[0]))      # ... to the API's edit
    expected, expected_plain = readings(toy, ref.images), readings(toy, model.sample([0]).images)
    for attr in toy.attributes:                                         # shown with 4 decimals
        assert _score(page, attr, "edited") == pytest.approx(expected[attr], abs=6e-5)
        assert _score(page, attr, "unedited") == pytest.approx(expected_plain[attr], abs=6e-5)

    # name pca's third direction "hat": saved in the file's metadata, shown on the sliders
    page.locator("#name-direction input").click()
    page.locator('[role=option][aria-label="pca / pc3"]').click()
    page.locator("#name-text textarea").fill("hat")
    page.locator("#save-name").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('saved: pc3: hat')")
    d = load_directions(session.run_dir / "directions" / "pca.safetensors")
    assert d.labels == {2: "hat"} and d.names == ["pc1", "pc2", "pc3"]
    page.locator("#direction-1 input").click()
    assert page.locator('[role=option][aria-label="pca / pc3: hat"]').count() == 1
    page.keyboard.press("Escape")

    # a file that is not an image: one message, and the app keeps working
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00" * 100)
    page.locator("#upload input[type=file]").set_input_files(str(junk))
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('junk.jpg is not a readable image')")
    before_src = page.locator("#edited img").get_attribute("src")
    box.fill("-2.5")
    box.press("Enter")
    page.wait_for_function("s => document.querySelector('#edited img').getAttribute('src') !== s", arg=before_src)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('update')")
    ref = model.sample([0], Edit(delta=-2.5 * session.direction("supervised", 0)))
    np.testing.assert_array_equal(_shown_image(page, app, "edited"), to_uint8(ref.images[0]))

    outside = [u for u in requests if not u.startswith(app) and not u.startswith(("data:", "blob:"))]
    assert not outside, f"the page fetched external resources: {outside[:5]}"
    page.close()


@pytest.mark.slow
def test_browser_typed_scale_upload_clear_and_export(browser, app, app_session, model, tmp_path):
    """A scale typed beyond the slider's range is applied (the slider widened, a message, no traceback);
    an upload shows itself, its reconstruction and the inversion error; junk and clearing return to the
    seed; an exported PNG has the size asked for and how it was made in its metadata."""
    import json

    app, log = app
    session = app_session
    page = browser.new_page()
    page.set_default_timeout(600_000)
    page.goto(app)
    page.wait_for_selector('#scores td[data-attr="smile"][data-which="edited"]')
    assert page.locator("#direction-0 input").input_value() == "supervised / smile"
    assert page.locator("#scale-0 input[type=range]").get_attribute("max") == "3"  # the file's scales: +-3
    _set_scale(page, 0, 4.5)  # beyond the range
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('beyond its range')")
    ref = model.sample([0], Edit(delta=4.5 * session.direction("supervised", 0)))
    np.testing.assert_array_equal(_shown_image(page, app, "edited"), to_uint8(ref.images[0]))
    page.wait_for_function("() => document.querySelector('#scale-0 input[type=range]').getAttribute('max') === '4.5'")
    assert page.locator("#scale-0 input[type=number]").input_value() == "4.5"
    assert "Traceback" not in log.read_text() and "Error" not in log.read_text()

    # an upload: the image as the model sees it, its reconstruction, the inversion error
    face = to_uint8(model.sample([11]).images[0])
    save_png(face, tmp_path / "face.png")
    page.locator("#upload input[type=file]").set_input_files(str(tmp_path / "face.png"))
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('inversion error')")
    np.testing.assert_array_equal(_shown_image(page, app, "uploaded"), face)
    x = torch.from_numpy(face).permute(2, 0, 1)[None].float() / 127.5 - 1
    recon = model.sample(x_T=model.invert(x, fixed_point_iterations=1).x_T).images
    np.testing.assert_array_equal(_shown_image(page, app, "original"), to_uint8(recon[0]))
    shown_error = float(re.search(r"inversion error ([0-9.]+)", page.locator("#status").inner_text()).group(1))
    assert shown_error == pytest.approx(float((recon - x).abs().mean() / 2), abs=1e-4)

    # clearing the box: back to the seed
    page.locator("#upload button[aria-label='Clear']").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.startsWith('seed 0')")
    np.testing.assert_array_equal(_shown_image(page, app, "original"), to_uint8(model.sample([0]).images[0]))
    assert not page.locator("#uploaded img").count() or not page.locator("#uploaded").is_visible()

    # an export: the size asked for, a new name each time, how it was made in the metadata
    page.locator("#export-size input").click()
    page.locator('[role=option][aria-label="512 px"]').click()
    page.locator("#export-png").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('PNG: ')")
    path = Path(re.search(r"PNG: (\S+\.png)", page.locator("#status").inner_text()).group(1))
    assert path.parent == session.run_dir / "explore"
    with Image.open(path) as im:
        assert im.size == (512, 512)
        meta = json.loads(im.text["hspace"])
    assert meta["seed"] == 0 and meta["window"] == [0, T - 1] and meta["model"] == "toyfaces"
    assert meta["sliders"] == [{"file": "supervised", "index": 0, "name": "smile", "scale": 4.5}]
    assert "Traceback" not in log.read_text()
    assert not list((REPO / "pipeline" / "explore").glob("*.pyi"))  # gradio wrote no stub into the package
    page.close()

