"""`hspace explore`: a local gradio app over a run's model and directions files.

The page wires :class:`~pipeline.explore.session.ExploreSession` to controls: a seed (or an
uploaded image), sliders bound to directions, the Asyrp toggle, the edited step window and eta;
the unedited and edited images with the scorer's readings; naming a direction; exporting the
image and the combination. It binds to 127.0.0.1 unless ``--host`` says otherwise, sends no
telemetry and loads nothing from outside (gradio serves its own assets and local fonts).
"""
from __future__ import annotations

import html
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.errors import HSpaceError, InputError, Interrupted
from pipeline.explore.session import ExploreSession, Slider

MAX_SLIDERS = 8
SHOWN_SLIDERS = 3
DISPLAY_PX = 256
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


def scores_html(scores: dict[str, tuple[float, float]]) -> str:
    """The readings as a table; every cell carries data-attr / data-which for the browser test."""
    if not scores:
        return "<p>(no scorer configured)</p>"
    rows = "".join(
        f"<tr><td>{html.escape(a)}</td>"
        + "".join(f'<td data-attr="{html.escape(a)}" data-which="{w}">{v:.4f}</td>'
                  for w, v in (("unedited", u), ("edited", e), ("change", e - u)))
        + "</tr>" for a, (u, e) in scores.items())
    return ('<table class="scores"><thead><tr><th>attribute</th><th>unedited</th><th>edited</th><th>change</th>'
            f"</tr></thead><tbody>{rows}</tbody></table>")


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


def build_app(session: ExploreSession, export_dir: str | os.PathLike | None = None):
    """The gradio Blocks of the app (not launched)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    model = session.model
    T = model.num_steps
    export_dir = Path(export_dir or tempfile.mkdtemp(prefix="hspace-explore-"))  # under the temp dir gradio serves
    eta0 = [float(v) for v in model.eta]
    uniform_eta = all(v == eta0[0] for v in eta0)
    choices = _ordered_choices(session)
    scorer = getattr(session.scorer, "name", None) or "none"

    def sliders_of(rows) -> list[Slider]:
        return [Slider(*_key(choice), float(scale or 0.0)) for choice, scale in zip(rows[::2], rows[1::2]) if choice]

    def eta_of(value):
        return None if (not uniform_eta and float(value) == eta0[0]) else float(value)

    def update(source, seed, asyrp, first, last, eta, *rows):
        try:
            view = session.render(seed if source is None else source, sliders_of(rows), asyrp=bool(asyrp),
                                  window=(int(first), int(last)), eta=eta_of(eta), seed=int(seed or 0))
        except HSpaceError as e:
            return gr.skip(), gr.skip(), gr.skip(), f"**error:** {html.escape(str(e))}", None
        where = "seed" if source is None else "uploaded image"
        status = f"{where}; update {view.seconds * 1000:.0f} ms"
        return _enlarge(view.original), _enlarge(view.edited), scores_html(view.scores), status, view

    def upload(file):
        if file is None:
            return gr.skip(), gr.skip()
        try:
            key = session.add_image(file)
        except HSpaceError as e:
            message = str(e).replace(str(file), Path(str(file)).name)  # not gradio's upload folder
            gr.Warning(message)
            return gr.skip(), f"**error:** {html.escape(message)}"
        return key, f"inverting {Path(str(file)).name} ..."

    def rebind(choice):
        file, _ = _key(choice)
        m = session.suggested_scale(file)
        return gr.update(minimum=-m, maximum=m, step=_step(m))

    def name_direction(choice, label):
        try:
            shown = session.name_direction(*_key(choice), label)
        except HSpaceError as e:
            return [gr.skip()] * (MAX_SLIDERS + 1) + [f"**error:** {html.escape(str(e))}"]
        new = _ordered_choices(session)
        file, _ = _key(choice)
        msg = f"saved: {html.escape(shown)} (in {html.escape(str(session.run_dir / 'directions' / file))}.safetensors)"
        return [gr.update(choices=new)] * (MAX_SLIDERS + 1) + [msg]

    def export_png(view):
        if view is None:
            return gr.skip(), "nothing to export yet"
        path = session.export_png(view, export_dir / "explore-edited.png")
        return gr.update(value=str(path), visible=True), f"PNG: {path}"

    def export_directions(name, asyrp, first, last, *rows):
        try:
            path = session.export_directions(name, sliders_of(rows), (int(first), int(last)), bool(asyrp))
        except HSpaceError as e:
            return [gr.skip()] * (MAX_SLIDERS + 2) + [f"**error:** {html.escape(str(e))}"]
        new = _ordered_choices(session)
        return [gr.update(choices=new)] * (MAX_SLIDERS + 1) + [gr.update(value=str(path), visible=True),
                                                               f"saved the combination as {path}"]

    with gr.Blocks(title="hspace explore", analytics_enabled=False) as demo:
        gr.Markdown(f"### hspace explore: `{html.escape(str(model.name_or_path))}`, T={T}, run `{session.run_dir}`, "
                    f"scorer `{scorer}`")
        source = gr.State(None)  # None: the seed; else the key of an uploaded image
        view_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):  # the source, the sampler, naming and export
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                random_seed = gr.Button("random seed", elem_id="random-seed", size="sm")
                image_file = gr.File(label="or a real image (DDIM-inverted)", elem_id="upload", height=120)
                asyrp = gr.Checkbox(False, label="Asyrp (D_t from an unedited pass)", elem_id="asyrp")
                first = gr.Slider(0, T - 1, value=0, step=1, label="first edited step (0 = noisiest)", elem_id="first")
                last = gr.Slider(0, T - 1, value=T - 1, step=1, label="last edited step", elem_id="last")
                eta_label = "eta (0 DDIM, 1 DDPM-like)" + ("" if uniform_eta else "; conf.yaml's per-step list until moved")
                eta = gr.Slider(0, 1, value=eta0[0], step=0.05, elem_id="eta", label=eta_label)
                with gr.Group():
                    name_choice = gr.Dropdown(choices, value=choices[0][1] if choices else None,
                                              label="direction to name", elem_id="name-direction")
                    name_text = gr.Textbox(label="its name (e.g. hat; empty removes it)", elem_id="name-text")
                name_button = gr.Button("save name", elem_id="save-name", size="sm")
                export_name = gr.Textbox("combination", label="save the sliders as directions/<name>.safetensors",
                                         elem_id="export-name")
                with gr.Row():
                    export_dirs_button = gr.Button("save combination", elem_id="export-directions", size="sm")
                    export_png_button = gr.Button("export PNG", elem_id="export-png", size="sm")
                exported = gr.File(label="exported file", interactive=False, elem_id="exported", visible=False)
            with gr.Column(scale=2):  # the images, their readings and the sliders
                with gr.Row():
                    original = gr.Image(label="unedited", format="png", interactive=False, elem_id="original",
                                        buttons=["download", "fullscreen"])
                    edited = gr.Image(label="edited", format="png", interactive=False, elem_id="edited",
                                      buttons=["download", "fullscreen"])
                with gr.Row():
                    scores = gr.HTML(elem_id="scores")
                    status = gr.Markdown(elem_id="status")
                rows, groups = [], []
                for k in range(MAX_SLIDERS):
                    value = choices[k % len(choices)][1] if choices else None
                    with gr.Row(visible=k < SHOWN_SLIDERS, equal_height=True) as row:
                        d = gr.Dropdown(choices, value=value, label=f"direction {k + 1}", elem_id=f"direction-{k}",
                                        scale=2)
                        m = session.suggested_scale(*_key(value)) if value else 3.0
                        s = gr.Slider(-m, m, value=0.0, step=_step(m), label="scale", elem_id=f"scale-{k}", scale=3)
                    rows += [d, s]
                    groups.append(row)
                shown = gr.State(SHOWN_SLIDERS)
                more = gr.Button("add a slider", elem_id="add-slider", size="sm")

        inputs = [source, seed, asyrp, first, last, eta, *rows]
        outputs = [original, edited, scores, status, view_state]
        events = {"fn": update, "inputs": inputs, "outputs": outputs, "trigger_mode": "always_last", "show_progress": "hidden"}
        demo.load(**events)
        for control in (asyrp, first, last, eta, *rows):
            control.change(**events)
        seed.change(lambda: None, outputs=source).then(**events)
        random_seed.click(lambda: (int(np.random.default_rng().integers(0, 2**31 - 1)), None), outputs=[seed, source])
        image_file.upload(upload, inputs=image_file, outputs=[source, status]).then(**events)
        for d, s in zip(rows[::2], rows[1::2]):
            d.change(rebind, inputs=d, outputs=s)

        def add_row(n):
            n = min(n + 1, MAX_SLIDERS)
            return [n] + [gr.update(visible=k < n) for k in range(MAX_SLIDERS)]

        more.click(add_row, inputs=shown, outputs=[shown, *groups])
        dropdowns = [*rows[::2], name_choice]
        name_button.click(name_direction, inputs=[name_choice, name_text], outputs=[*dropdowns, status])
        export_png_button.click(export_png, inputs=view_state, outputs=[exported, status])
        export_dirs_button.click(export_directions, inputs=[export_name, asyrp, first, last, *rows],
                                 outputs=[*dropdowns, exported, status])
    return demo


def launch(demo, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serve ``demo`` on host:port (checked free first); returns the URL. ``block``: until Ctrl+C."""
    port = free_port(host, port)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                ssr_mode=False, mcp_server=False, pwa=False, footer_links=["api", "settings"])
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
    launch(build_app(session), host, port)
