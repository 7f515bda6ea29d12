"""`hspace explore`: a local gradio app over a run's model and directions files.

The page wires :class:`~pipeline.explore.session.ExploreSession` to controls: a seed (or an
uploaded image), sliders bound to directions, the Asyrp toggle, the edited step window and eta;
the unedited and edited images (and an upload as the model sees it, with its inversion error) with
the scorer's readings; naming a direction; exporting the image and the combination. Every slider
ranges over ``ExploreSession.slider_range``; a value typed beyond it is applied and the slider
widened, with a message. It binds to 127.0.0.1 unless ``--host`` says otherwise, sends no telemetry
and loads nothing from outside (gradio serves its own assets and local fonts).
"""
from __future__ import annotations

import functools
import html
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pipeline.errors import HSpaceError, InputError, Interrupted
from pipeline.explore.session import ExploreSession, Slider

MAX_SLIDERS = 8
SHOWN_SLIDERS = 3
DISPLAY_PX = 256
#: sizes (pixels, longer side) offered for an exported image; 0: the model's own
EXPORT_SIZES = (0, 256, 512, 1024)
#: files offered first on the sliders (the rest follow by name)
PREFERRED = ("supervised", "disentangled", "real", "pca", "jacobian")


def free_port(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` (0: any free one); else a one-line InputError."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a TIME_WAIT port is free
        try:
            s.bind((host, int(port)))
        except OSError as e:
            if int(port) and e.errno in (98, 48, 10048):  # EADDRINUSE (Linux, macOS, Windows)
                raise InputError(f"port {port} on {host} is already in use; pass --port with another number "
                                 f"(--port 0 picks a free one)") from None
            raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
        return s.getsockname()[1]


def _enlarge(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> nearest-neighbour upscaled to about DISPLAY_PX (small models are 32 px)."""
    k = max(1, DISPLAY_PX // max(image.shape[:2]))
    return image.repeat(k, 0).repeat(k, 1) if k > 1 else image


def scores_html(scores: dict) -> str:
    """The readings as a table: unedited, edited, the change in the scorer's units and in standard
    deviations of its unedited scores; a categorical score as its classes. Every cell carries
    data-attr / data-which / data-value (the raw number) for the browser test."""
    if not scores:
        return "<p>(no scorer configured)</p>"

    def cell(a, which, text, value):
        return f'<td data-attr="{html.escape(a)}" data-which="{which}" data-value="{value!r}">{html.escape(text)}</td>'

    rows = []
    for a, r in scores.items():
        if r.classes is not None:
            change = "same class" if round(r.edited) == round(r.unedited) else "changed class"
            sd = ""
        else:
            change = f"{r.change:+.4f}"
            sd = "" if r.change_sd is None else f"{r.change_sd:+.2f}"
        rows.append(f"<tr><td>{html.escape(a)}</td>" + cell(a, "unedited", r.label(r.unedited), r.unedited)
                    + cell(a, "edited", r.label(r.edited), r.edited) + cell(a, "change", change, r.change)
                    + cell(a, "change_sd", sd, r.change_sd) + "</tr>")
    return ('<table class="scores"><thead><tr><th>attribute</th><th>unedited</th><th>edited</th><th>change</th>'
            f"<th>change (SD)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _ordered_choices(session: ExploreSession) -> list[tuple[str, str]]:
    rank = {f: i for i, f in enumerate(PREFERRED)}
    choices = sorted(session.choices(), key=lambda c: (rank.get(c[1][0], len(rank)), c[1][0], c[1][1]))
    return [(label, f"{file}::{index}") for label, (file, index) in choices]


def _step(largest: float) -> float:
    """A round slider step, about 1/100 of the range's half-width: 3 -> 0.01, 600 -> 1."""
    return float(10 ** np.floor(np.log10(largest / 100)))


def _key(value: str) -> tuple[str, int]:
    file, _, index = str(value).rpartition("::")
    return file, int(index)


@functools.cache
def _scale_slider_class():
    """gr.Slider that takes a value typed beyond its range instead of refusing it (gradio raises an error
    there); the app then widens the slider. Drawn by the same front-end component as gr.Slider. A
    subclass, not a patched instance: gradio re-creates a component from its class when an update
    changes its range. Defined with gradio's stub writer switched off: gradio writes a ``.pyi`` beside
    every module that defines a component, which would be this package's source folder."""
    import gradio as gr
    import gradio.component_meta as meta

    write_stub = getattr(meta, "create_or_modify_pyi", None)
    meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        class ScaleSlider(gr.Slider):
            is_template = True  # the front end draws it as the slider it derives from

            def preprocess(self, payload):
                return None if payload is None else float(payload)
    finally:
        if write_stub is not None:
            meta.create_or_modify_pyi = write_stub
    return ScaleSlider


def export_folder(session: ExploreSession) -> Path:
    """Where exported images go: ``<run_dir>/explore`` (the app serves files from there)."""
    return session.run_dir / "explore"


class Handlers:
    """The app's callbacks on an :class:`ExploreSession`; gradio values in, gradio updates out."""

    def __init__(self, session: ExploreSession, gr):
        self.session, self.gr = session, gr
        self.eta0 = [float(v) for v in session.model.eta]
        self.uniform_eta = all(v == self.eta0[0] for v in self.eta0)

    def sliders_of(self, rows) -> list[Slider]:
        return [Slider(*_key(choice), float(scale or 0.0)) for choice, scale in zip(rows[::2], rows[1::2]) if choice]

    def eta_of(self, value):
        return None if (not self.uniform_eta and float(value) == self.eta0[0]) else float(value)

    def beyond(self, rows) -> list[str]:
        """A note for every slider whose value lies beyond its range (typed in): it is applied."""
        notes = []
        for k, (choice, scale) in enumerate(zip(rows[::2], rows[1::2])):
            limit = self.session.slider_range(*_key(choice)) if choice else None
            if limit is not None and scale is not None and abs(float(scale)) > limit * (1 + 1e-9):
                notes.append(f"slider {k + 1}: {float(scale):g} lies beyond its range ±{limit:g}; applied, and "
                             "the slider widened")
        return notes

    def update(self, source, seed, asyrp, first, last, eta, *rows):
        """-> the uploaded image (shown only for an upload), unedited, edited, readings, status, the view."""
        gr = self.gr
        try:
            view = self.session.render(seed if source is None else source, self.sliders_of(rows), asyrp=bool(asyrp),
                                       window=(int(first), int(last)), eta=self.eta_of(eta), seed=int(seed or 0))
        except HSpaceError as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"**error:** {html.escape(str(e))}", None
        if view.source_image is None:
            where, shown = f"seed {int(seed or 0)}", gr.update(value=None, visible=False)
        else:
            where = f"uploaded image, inversion error {view.inversion_error:.4f} (mean absolute pixel difference, [0, 1])"
            shown = gr.update(value=_enlarge(view.source_image), visible=True)
        status = "; ".join([f"{where}; update {view.seconds * 1000:.0f} ms", *self.beyond(rows)])
        return shown, _enlarge(view.original), _enlarge(view.edited), scores_html(view.scores), status, view

    def upload(self, file, seed, *rest):
        """A readable image becomes the source and is shown; anything else is said, the box is emptied and the
        seed is shown again (what the box shows is what the images come from)."""
        gr = self.gr
        if file is None:
            return (gr.skip(),) * 8
        try:
            key, box, note = self.session.add_image(file), gr.skip(), ""
        except HSpaceError as e:
            message = str(e).replace(str(file), Path(str(file)).name)  # not gradio's upload folder
            gr.Warning(message)
            key, box, note = None, None, f"**error:** {html.escape(message)}; showing the seed again"
        shown = self.update(key, seed, *rest)
        status = f"{note}; {shown[4]}" if note and isinstance(shown[4], str) else shown[4]
        return (key, box, *shown[:4], status, shown[5])

    def rebind(self, choice, value):
        """A slider bound to another direction takes that direction's range (or its value's, if larger)."""
        m = max(self.session.slider_range(*_key(choice)), abs(float(value or 0.0)))
        return self.gr.update(minimum=-m, maximum=m, step=_step(m))

    def widen(self, choice, value):
        """Widen a slider to a value typed beyond its range (nothing otherwise)."""
        if not choice or value is None or abs(float(value)) <= self.session.slider_range(*_key(choice)):
            return self.gr.skip()
        return self.gr.update(minimum=-abs(float(value)), maximum=abs(float(value)))

    def name_direction(self, choice, label):
        gr, session = self.gr, self.session
        try:
            shown = session.name_direction(*_key(choice), label)
        except HSpaceError as e:
            return [gr.skip()] * (MAX_SLIDERS + 1) + [f"**error:** {html.escape(str(e))}"]
        file, _ = _key(choice)
        msg = f"saved: {html.escape(shown)} (in {html.escape(str(session.run_dir / 'directions' / file))}.safetensors)"
        return [gr.update(choices=_ordered_choices(session))] * (MAX_SLIDERS + 1) + [msg]

    def export_png(self, view, size):
        if view is None:
            return self.gr.skip(), "nothing to export yet"
        path = self.session.export_png(view, int(size) or None, export_folder(self.session))
        return self.gr.update(value=str(path), visible=True), f"PNG: {path} (how it was made: in its metadata)"

    def export_directions(self, name, asyrp, first, last, *rows):
        gr = self.gr
        try:
            path = self.session.export_directions(name, self.sliders_of(rows), (int(first), int(last)), bool(asyrp))
        except HSpaceError as e:
            return [gr.skip()] * (MAX_SLIDERS + 2) + [f"**error:** {html.escape(str(e))}"]
        new = _ordered_choices(self.session)
        return [gr.update(choices=new)] * (MAX_SLIDERS + 1) + [gr.update(value=str(path), visible=True),
                                                               f"saved the combination as {path}"]

    def add_row(self, n):
        n = min(n + 1, MAX_SLIDERS)
        return [n] + [self.gr.update(visible=k < n) for k in range(MAX_SLIDERS)]


def _controls(session: ExploreSession, gr, eta0: float, uniform_eta: bool) -> SimpleNamespace:
    """The left column: the source, the sampler, naming and export."""
    T, choices = session.model.num_steps, _ordered_choices(session)
    c = SimpleNamespace()
    c.seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
    c.random_seed = gr.Button("random seed", elem_id="random-seed", size="sm")
    c.image_file = gr.File(label="or a real image (DDIM-inverted)", elem_id="upload", height=120)
    c.asyrp = gr.Checkbox(False, label="Asyrp (D_t from an unedited pass)", elem_id="asyrp")
    c.first = gr.Slider(0, T - 1, value=0, step=1, label="first edited step (0 = noisiest)", elem_id="first")
    c.last = gr.Slider(0, T - 1, value=T - 1, step=1, label="last edited step", elem_id="last")
    eta_label = "eta (0 DDIM, 1 DDPM-like)" + ("" if uniform_eta else "; conf.yaml's per-step list until moved")
    c.eta = gr.Slider(0, 1, value=eta0, step=0.05, elem_id="eta", label=eta_label)
    with gr.Group():
        c.name_choice = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="direction to name",
                                    elem_id="name-direction")
        c.name_text = gr.Textbox(label="its name (e.g. hat; empty removes it)", elem_id="name-text")
    c.name_button = gr.Button("save name", elem_id="save-name", size="sm")
    c.export_name = gr.Textbox("combination", label="save the sliders as directions/<name>.safetensors",
                               elem_id="export-name")
    with gr.Row():
        c.export_dirs_button = gr.Button("save combination", elem_id="export-directions", size="sm")
        c.export_size = gr.Dropdown([("model's size" if v == 0 else f"{v} px", v) for v in EXPORT_SIZES],
                                    value=DISPLAY_PX, label="PNG size", elem_id="export-size", min_width=100)
        c.export_png_button = gr.Button("export PNG", elem_id="export-png", size="sm")
    c.exported = gr.File(label="exported file", interactive=False, elem_id="exported", visible=False)
    return c


def _views(session: ExploreSession, gr) -> SimpleNamespace:
    """The right column: the images, their readings and the sliders."""
    choices, ScaleSlider = _ordered_choices(session), _scale_slider_class()
    v = SimpleNamespace(rows=[], groups=[])
    with gr.Row():
        v.uploaded = gr.Image(label="uploaded (as the model sees it)", format="png", interactive=False,
                              elem_id="uploaded", visible=False, buttons=["download", "fullscreen"])
        v.original = gr.Image(label="unedited (for an upload: its reconstruction)", format="png", interactive=False,
                              elem_id="original", buttons=["download", "fullscreen"])
        v.edited = gr.Image(label="edited", format="png", interactive=False, elem_id="edited",
                            buttons=["download", "fullscreen"])
    v.status = gr.Markdown(elem_id="status")
    v.scores = gr.HTML(elem_id="scores")
    for k in range(MAX_SLIDERS):
        value = choices[k % len(choices)][1] if choices else None
        with gr.Row(visible=k < SHOWN_SLIDERS, equal_height=True) as row:
            d = gr.Dropdown(choices, value=value, label=f"direction {k + 1}", elem_id=f"direction-{k}", scale=2)
            m = session.slider_range(*_key(value)) if value else 3.0
            s = ScaleSlider(-m, m, value=0.0, step=_step(m), label="scale", elem_id=f"scale-{k}", scale=3)
        v.rows += [d, s]
        v.groups.append(row)
    v.more = gr.Button("add a slider", elem_id="add-slider", size="sm")
    return v


def build_app(session: ExploreSession):
    """The gradio Blocks of the app (not launched): the controls, the views, and the events between them."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    h = Handlers(session, gr)
    model = session.model
    scorer = getattr(session.scorer, "name", None) or "none"
    with gr.Blocks(title="hspace explore", analytics_enabled=False) as demo:
        gr.Markdown(f"### hspace explore: `{html.escape(str(model.name_or_path))}`, T={model.num_steps}, run "
                    f"`{session.run_dir}`, scorer `{scorer}`")
        source = gr.State(None)  # None: the seed; else the key of an uploaded image
        view_state, shown = gr.State(None), gr.State(SHOWN_SLIDERS)
        with gr.Row():
            with gr.Column(scale=1):
                c = _controls(session, gr, h.eta0[0], h.uniform_eta)
            with gr.Column(scale=2):
                v = _views(session, gr)
        rows, dropdowns = v.rows, [*v.rows[::2], c.name_choice]
        inputs = [source, c.seed, c.asyrp, c.first, c.last, c.eta, *rows]
        outputs = [v.uploaded, v.original, v.edited, v.scores, v.status, view_state]
        events = {"fn": h.update, "inputs": inputs, "outputs": outputs, "trigger_mode": "always_last",
                  "show_progress": "hidden"}
        demo.load(**events)
        for control in (c.asyrp, c.first, c.last, c.eta, *rows):
            control.change(**events)
        c.seed.change(lambda: None, outputs=source).then(**events)
        c.random_seed.click(lambda: (int(np.random.default_rng().integers(0, 2**31 - 1)), None), outputs=[c.seed, source])
        c.image_file.upload(h.upload, inputs=[c.image_file, *inputs[1:]], outputs=[source, c.image_file, *outputs],
                            show_progress="hidden")
        c.image_file.clear(lambda: None, outputs=source).then(**events)  # clearing the box: back to the seed
        for d, s in zip(rows[::2], rows[1::2]):
            d.change(h.rebind, inputs=[d, s], outputs=s)
            s.change(h.widen, inputs=[d, s], outputs=s)
        v.more.click(h.add_row, inputs=shown, outputs=[shown, *v.groups])
        c.name_button.click(h.name_direction, inputs=[c.name_choice, c.name_text], outputs=[*dropdowns, v.status])
        c.export_png_button.click(h.export_png, inputs=[view_state, c.export_size], outputs=[c.exported, v.status])
        c.export_dirs_button.click(h.export_directions, inputs=[c.export_name, c.asyrp, c.first, c.last, *rows],
                                   outputs=[*dropdowns, c.exported, v.status])
    return demo


def launch(demo, host: str = "127.0.0.1", port: int = 7860, block: bool = True, allowed_paths=()) -> str:
    """Serve ``demo`` on host:port (checked free first); returns the URL. ``block``: until Ctrl+C.
    ``allowed_paths``: folders whose files the page may offer for download (the exports)."""
    port = free_port(host, port)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                ssr_mode=False, mcp_server=False, pwa=False, footer_links=["api", "settings"],
                allowed_paths=[str(p) for p in allowed_paths])
    url = f"http://{host}:{port}/"
    if not block:
        return url
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"hspace explore: warning: listening on {host}: anyone who can reach it can use the app (no login)")
    print(f"hspace explore: {url} (Ctrl+C to stop)", flush=True)
    try:
        while True:
            time.sleep(0.5)
    except (KeyboardInterrupt, Interrupted):  # Ctrl+C or SIGTERM (the CLI raises Interrupted): a normal end
        print("hspace explore: stopped", flush=True)
    finally:
        demo.close()
    return url


def run_explore(cfg, host: str = "127.0.0.1", port: int = 7860) -> None:
    """`hspace explore`: check the port, load the run's model, directions and scorer, serve the app."""
    free_port(host, port)  # a taken port is said before the model loads
    session = ExploreSession.from_config(cfg)
    if session.model.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)  # one small sample per update: extra threads only contend (docs/explore.md)
    launch(build_app(session), host, port, allowed_paths=[export_folder(session)])
