"""`hspace report`: ``<run_dir>/report/index.html``, one page a researcher can share.

The page lives in ``<run_dir>/report/`` with everything it shows: figures copied into ``img/``, every
data file it summarises copied into ``data/`` (and linked where it is named), the resolved
configuration as ``data/config.yaml``; the folder opens from disk without a server and can be
zipped as it is. The page says how it was made (the command line, the configuration file read) and
how to make it again.

Its sections, in order: an overview (with the selection's confounds), then ``SECTIONS`` (Table 1,
calibrated Table 1, dose-response, PCA against random, image quality, PCA of h, edit strips, the
probes and Fig. 8 (evaluation/semantics.py), the contact sheets with their confound check, where the
time went), then how to reproduce it. A section is a function ``(page, run_dir)`` that adds nothing
when the run lacks its files: a new one is one more entry of ``SECTIONS``. ``hspace run`` renders the
page before its further analyses (pipeline.registry.run_order) and names their artefacts ``pending``:
a section whose data is pending says it is still to come and which stage makes it
(:meth:`evaluation.page.Page.to_come`), and the page does not show or record a pending artefact an
earlier run left.
"""
from __future__ import annotations

import datetime as dt
import html
import json
import shlex
import subprocess
from pathlib import Path

import pandas as pd

from evaluation import dose, effects, sae, semantics
from evaluation.costs import costs_html
from evaluation.folders import CALIBRATED
from evaluation.page import Page
from pipeline.config import to_yaml
from pipeline.formats.identity import seal_folder, verify
from pipeline.formats.samples import read_manifest
from pipeline.io import atomic_path
from pipeline.methods.selection import chance_difference
from pipeline.process import command


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------- sections
def overview(page: Page, run_dir: Path) -> None:
    manifest = read_manifest(run_dir)
    model = manifest["model"]
    ev = run_dir / "evaluation"
    summary = json.loads((ev / "summary.json").read_text()) if (ev / "summary.json").exists() else {}
    page.section("overview", "Overview")
    cards = [("samples", f"{manifest.get('num_samples', '?')}"), ("model", Path(str(model["name_or_path"])).name),
             ("steps T / eta", f"{len(model['timesteps'])} / {sorted(set(model['eta']))}"),
             ("h shape", "x".join(map(str, model["h_shape"])))]
    for key, label in (("disentangled_own_strongest", "disentangled directions whose own effect is strongest"),
                       ("rows_with_lower_max_off_diagonal", "rows whose largest side effect disentangling lowers")):
        if summary.get(key):
            value = "{} of {}".format(*summary[key])
            ci = summary.get(f"{key}_ci")
            if ci:  # how many checks the 95% bootstrap interval confirms, and how many it contradicts
                value += f" (95% CI: {ci['confirmed']} confirmed, {ci['contradicted']} contradicted)"
            cards.append((label, value))
    for key, label in (("random_effect_per_pixel", "norm-matched"), ("random_pixel_matched_effect_per_pixel", "pixel-matched")):
        if summary.get(key) is not None:
            cards.append((f"consistent attribute change per pixel change: PCA vs random ({label})",
                          f"{summary['pca_effect_per_pixel']:.1f} vs {summary[key]:.1f}"))
    page.add('<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{html.escape(str(v))}</div><div class="k">{html.escape(k)}</div></div>'
        for k, v in cards) + "</div>")
    for r in confounded(run_dir).itertuples():
        page.warning(f"<b>Confound:</b> the top and bottom {r.n} samples of <b>{html.escape(r.attribute)}</b> also differ "
                     f"in <b>{html.escape(r.other)}</b> by {r.difference:+.2f} standard deviations (above "
                     f"<code>select.confound_threshold</code> = {r.threshold:g} and above chance, "
                     f"{chance_difference(r.n):.2f}): its supervised direction may move "
                     f"{html.escape(r.other)} too. See <a href=\"#annotators\">the contact sheets</a>.")
    page.note("Directions in the semantic latent space (h-space, the U-Net bottleneck at every sampling step) found by "
              "PCA, Jacobian subspace iteration, supervised mean differences (eq. 10) and their linear disentanglement "
              "(eq. 11), evaluated on held-out seeds as in Table 1 of Haas et al. Click a figure to open it at full "
              "size; every number has its file in <code>data/</code> (<a href=\"#provenance\">how this page was made</a>).")


def pca_section(page: Page, run_dir: Path) -> None:
    ev_png = run_dir / "directions" / "explained_variance.png"
    if ev_png.exists():
        page.section("pca", "PCA of h")
        page.image(ev_png, "Explained variance ratio of the leading components at every step.")


#: edit-strip families: folder, title, what its names and scales mean
STRIP_FAMILIES = (
    ("supervised", "Supervised directions (eq. 10)", ""),
    ("disentangled", "Disentangled directions (eq. 11)", ""),
    ("pca", "PCA directions", "Scales in standard deviations of h along the component."),
    ("pca_random", "Random directions, norm-matched", "The same per-step norms as the PCA directions: scales in the "
     "same units."),
    ("jacobian", "Jacobian directions (Alg. 1)", "<code>sI-tT-vK</code>: the K-th right singular vector of the "
     "Jacobian of the U-Net's output with respect to h at step T of sample (seed) I, applied at every step scaled "
     "by that step's singular value (\"global at index\"). Image-specific, shown on other seeds. Its size is the "
     "singular value (about 0.1 on the toy), hence scales of hundreds (<code>jacobian.scales</code>)."),
    ("supervised_xT", "The supervised directions in x_T space (Fig. 8 baseline)", "Scales in multiples of the "
     "class-mean gap of x_T."),
    ("real", "Real-image directions", ""),
)


def strips_section(page: Page, run_dir: Path) -> None:
    """Every family's edit strips once: those the calibrated evaluation drew from its sweep
    (``evaluation-calibrated/strips``) and the others of the figures stage (``edits/``)."""
    from pipeline.stages.evaluate import STRIP_FOLDERS

    evaluated = set(STRIP_FOLDERS.values())
    pending = CALIBRATED in page.pending
    found = []
    for folder, title, explain in STRIP_FAMILIES:
        where = run_dir / CALIBRATED / "strips" / folder
        if folder not in evaluated or pending or not any(where.glob("*.png")):
            where = run_dir / "edits" / folder
        pngs = sorted(where.glob("*.png"))
        if pngs:
            found.append((folder, title, explain, pngs))
    if not found and not pending:
        return
    page.section("edits", "Edit strips", "Strips")
    page.still_to_come(CALIBRATED, "the strips of the evaluated families that the dose-response sweep draws")
    page.note("Rows: held-out seeds (<code>edit.seeds</code>); columns: edit strengths, <i>unedited</i> the plain sample. "
              "A supervised or disentangled direction is shown at multiples of its calibrated strength (<i>+1&times; "
              "cal.</i> moves its own attribute by the calibration target, 1 SD by default; in brackets the scale "
              "itself): the images the dose-response was measured on. "
              "Click a strip to open it at full size.")
    for folder, title, explain, pngs in found:
        page.add(f"<h3>{html.escape(title)}</h3>")
        if explain:
            page.note(explain)
        captions = strip_captions(run_dir / "directions", folder)
        page.add('<div class="figs">')
        for png in pngs:
            page.image(png, html.escape(captions.get(png.stem, "")), name=f"edit-{folder}-{png.name}",
                       alt=f"edit strip of {png.stem}")
        page.add("</div>")


def confounded(run_dir: Path) -> pd.DataFrame:
    """The confounded rows of ``contact_sheets/confounds.csv`` (empty without one)."""
    path = run_dir / "contact_sheets" / "confounds.csv"
    if not path.exists():
        return pd.DataFrame(columns=["attribute", "other", "difference", "threshold", "n", "confounded"])
    table = pd.read_csv(path)
    return table[table.confounded]


def contact_sheets_section(page: Page, run_dir: Path) -> None:
    sheets = sorted((run_dir / "contact_sheets").glob("*.png"))
    if not sheets:
        return
    path = run_dir / "contact_sheets" / "confounds.csv"
    table = pd.read_csv(path) if path.exists() else None
    page.section("annotators", "Annotator contact sheets and confounds", "Contact sheets")
    page.note("The most and least extreme samples of every selected attribute, with their scores: check the annotator "
              "by eye before trusting a supervised direction. Below each sheet, the confound check: how much every "
              "other annotated attribute differs between the attribute's top and bottom samples, in standard "
              "deviations over all samples: over the whole selection (<code>select.n</code> per side, what the "
              "supervised direction is made of) and over the samples shown. <i>chance</i>: what chance alone gives with n per "
              "side, two standard errors (2 sqrt(2/n)); a difference counts as a confound (red) above both it and "
              "<code>select.confound_threshold</code>. "
              + (f"All: {page.data(path)}; the selection: {page.data(run_dir / 'selection.parquet')}."
                 if table is not None else ""))
    for png in sheets:
        page.image(png, "", name=f"sheet-{png.name}", alt=f"contact sheet of {png.stem}")
        rows = table[table.attribute == png.stem] if table is not None else []
        if len(rows):
            head = "".join(f"<th>{html.escape(o)}</th>" for o in rows.other)
            body = ""
            for col, n, marked in (("difference", int(rows.n.iloc[0]), True),
                                   ("shown_difference", int(rows.shown.iloc[0]), False)):
                if n and rows[col].notna().all():
                    cells = "".join(f'<td class="{"over" if marked and over else ""}">{v:+.2f}</td>'
                                    for v, over in zip(rows[col], rows.confounded))
                    label = f"the {n} per side{' shown' if not marked else ''}"
                    body += f"<tr><td>{label}</td><td>{chance_difference(n):.2f}</td>{cells}</tr>"
            page.table(f"<table><thead><tr><th>{html.escape(png.stem)}: top - bottom (SD)</th><th>chance</th>{head}"
                       f"</tr></thead><tbody>{body}</tbody></table>")


def costs_section(page: Page, run_dir: Path) -> None:
    timings = run_dir / "timings.json"
    table = costs_html(run_dir, link=page.data(timings) if timings.exists() else "")
    if table:
        page.section("costs", "Where the time went", "Time")
        page.add(table)


#: the page between its overview and how it was made, in order: (page, run_dir) -> None each
SECTIONS = (effects.table1_section, effects.calibrated_section, dose.report_section, sae.report_section,
            effects.baselines_section,
            pca_section, strips_section, semantics.add_sections, contact_sheets_section, costs_section)


def reproduce_section(page: Page, run_dir: Path, cfg) -> None:
    """How the page was made and how to make it again: the command, the configuration, the data, provenance."""
    manifest = read_manifest(run_dir)
    model = manifest["model"]
    page.section("provenance", "How this page was made", "How it was made")
    made = command()
    if made is not None:
        config = (f"the configuration file <code>{html.escape(made['config'])}</code> (a copy: "
                  f"{page.data(Path(made['config']))})" if made["config"] else "no configuration file (the built-in defaults)")
        page.add(f"<p>This page was written by</p><pre>{html.escape(shlex.join(made['argv']))}</pre>"
                 f"<p class=\"note\">run in <code>{html.escape(made['cwd'])}</code>, reading {config} and the overrides "
                 "on the command line.</p>")
    else:
        page.note("This page was written from Python (<code>pipeline.stages.report.build_report</code>), not by a command.")
    if cfg is not None:
        link = page.write_data("config-resolved.yaml", to_yaml(cfg))
        again = shlex.join(["hspace", "run", "--config", str(Path(cfg.run_dir) / "report" / "data" / "config-resolved.yaml"),
                            f"run_dir={cfg.run_dir}-again"])
        page.add(f"<p>The configuration as resolved: {link}, every setting of every stage. From the same directory, "
                 f"this makes the run again in a new run directory:</p><pre>{html.escape(again)}</pre>"
                 "<details><summary>the configuration</summary><pre>" + html.escape(to_yaml(cfg)) + "</pre></details>")
    for name in ("annotations.parquet", "evaluation/per_sample.parquet", "evaluation/summary.json"):
        page.data(run_dir / name, Path(name).name)
    files = sorted(page.files)
    page.add("<h3>Data files</h3>")
    page.note("Every file this page summarises, copied into <code>data/</code> beside it: " + ", ".join(
        f'<a href="data/{html.escape(f)}"><code>{html.escape(f)}</code></a> '
        f'<span class="pm">({(page.out_dir / "data" / f).stat().st_size / 1024:.0f} kB)</span>' for f in files) + ".")
    prov = {"created": dt.datetime.now().isoformat(timespec="seconds"), "hspace commit": git_commit(),
            "model": model.get("name_or_path"), "weights fingerprint": model.get("weights_fingerprint"),
            "scheduler": model.get("scheduler"), "timesteps": model.get("timesteps"), "eta": model.get("eta"),
            "hook": model.get("hook"), "samples identity": (manifest.get("record") or {}).get("id"),
            "packages": manifest.get("packages")}
    page.add("<h3>Provenance</h3>")
    page.table("<table><tbody>" + "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:left;white-space:normal'>"
                                          f"<code>{html.escape(json.dumps(v) if not isinstance(v, str) else v)}</code></td></tr>"
                                          for k, v in prov.items()) + "</tbody></table>")


# ---------------------------------------------------------------------- the page
def build_report(run_dir, cfg=None, pending: dict[str, str] | None = None) -> Path:
    """The page; ``pending``: artefact -> the stage of this run still to make it (shown as still to come)."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        page = Page(tmp, pending)
        overview(page, run_dir)
        for section in SECTIONS:
            section(page, run_dir)
        reproduce_section(page, run_dir, cfg)
        subtitle = html.escape(f"{run_dir.resolve()} · {dt.datetime.now():%Y-%m-%d %H:%M}")
        (tmp / "index.html").write_text(page.render("hspace report", subtitle))
        if cfg is not None:
            from pipeline.registry import COMMANDS

            seal_folder(tmp, COMMANDS["report"].identity(cfg, reads=shown(cfg, pending)))
    return out / "index.html"


def strip_captions(dirs: Path, family: str) -> dict[str, str]:
    """Edit-strip file stem -> its direction's name with the label a user gave it ("pc3: hat")."""
    from pipeline.formats.directions import load_directions
    from pipeline.stages.edit import safe_name

    stem = {"supervised_xT": "supervised", "pca_random": ""}.get(family, family)
    path = dirs / f"{stem}.safetensors"
    if not stem or not path.exists():
        return {}
    d = load_directions(path)
    suffix = "-xT" if family == "supervised_xT" else ""
    return {safe_name(n) + suffix: d.display_name(i) for i, n in enumerate(d.names) if i in d.labels}


def shown(cfg, pending: dict[str, str] | None = None) -> tuple[str, ...]:
    """The artefacts the page reads: those of the run present now, but the ``pending`` ones."""
    from pipeline.registry import COMMANDS

    return tuple(n for n in COMMANDS["report"].read_names(cfg) if n not in (pending or {}))


def run_report(cfg, pending: dict[str, str] | None = None) -> Path:
    """``pending`` (from `hspace run`): artefact -> the stage of this run still to make it."""
    for name in shown(cfg, pending):  # what it shows is what the run holds now
        verify(cfg.run_dir, name)
    path = build_report(cfg.run_dir, cfg, pending)
    print(f"hspace report: {path}")
    return path
