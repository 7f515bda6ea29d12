"""`hspace report`: ``<run_dir>/report/index.html``, one page a researcher can share.

The page and its images live in ``<run_dir>/report/`` (images copied into ``report/img/``
and referenced relatively), so the folder opens from disk without a server and can be
zipped or copied as a whole. Sections: provenance and configuration, Table 1 (tables and
heatmaps) with the disentanglement checks, PCA against random directions, image change and
quality, PCA explained variance, edit strips per direction family, the per-step probes, Fig. 8
as effect against n (evaluation/semantics.py), and the annotator contact sheets.
"""
from __future__ import annotations

import datetime as dt
import html
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd

from evaluation.costs import costs_html
from evaluation.semantics import add_sections
from evaluation.tables import df_html, table1_html
from pipeline.config import to_yaml
from pipeline.formats.identity import seal_folder, verify
from pipeline.formats.samples import read_manifest
from pipeline.io import atomic_path

CSS = """
:root { --ink:#1d232b; --muted:#5b6570; --line:#e3e7ec; --accent:#2f6fdf; --bg:#f7f8fa; --good:#1a7f37; --bad:#b3261e; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:#1d232b; color:#fff; padding:28px 40px 22px; }
header h1 { margin:0 0 4px; font-size:24px; font-weight:600; }
header p { margin:0; color:#c5ccd5; font-size:14px; }
nav { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--line); padding:8px 40px; font-size:13px; }
nav a { color:var(--muted); text-decoration:none; margin-right:18px; }
nav a:hover { color:var(--accent); }
main { max-width:1180px; margin:0 auto; padding:10px 40px 60px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:18px 24px; margin:22px 0; }
h2 { font-size:19px; margin:0 0 10px; }
h3 { font-size:15px; margin:18px 0 8px; color:var(--muted); font-weight:600; }
p.note { color:var(--muted); font-size:13px; margin:6px 0 12px; }
table { border-collapse:collapse; font-size:13px; margin:8px 0 14px; }
th, td { border-bottom:1px solid var(--line); padding:5px 10px; text-align:right; white-space:nowrap; }
th:first-child, td:first-child { text-align:left; }
thead th { background:#f1f3f6; font-weight:600; }
tr.section td { background:#fafbfc; font-style:italic; color:var(--muted); text-align:left; }
td.best { font-weight:700; background:#fff4e5; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin:6px 0 12px; }
.card { border:1px solid var(--line); border-radius:8px; padding:10px 14px; min-width:200px; background:#fcfcfd; }
.card .v { font-size:20px; font-weight:600; }
.card .k { font-size:12px; color:var(--muted); }
.ok { color:var(--good); } .no { color:var(--bad); }
figure { margin:10px 0 18px; }
figure img { max-width:100%; border:1px solid var(--line); border-radius:4px; background:#fff; }
figcaption { font-size:12.5px; color:var(--muted); margin-top:4px; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(340px, 1fr)); gap:14px; }
details { margin:8px 0; } summary { cursor:pointer; color:var(--accent); }
pre { background:#f6f8fa; border:1px solid var(--line); border-radius:6px; padding:10px; font-size:12px; overflow:auto;
      max-height:420px; }
code { font-size:12.5px; }
.pm { color:#8a939c; font-size:12px; }
"""


class Page:
    """A tiny HTML builder that copies every image it shows into the report folder."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.images: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def section(self, anchor: str, title: str) -> None:
        if self.toc:
            self.add("</section>")
        self.toc.append((anchor, title))
        self.add(f'<section id="{anchor}"><h2>{html.escape(title)}</h2>')

    def image(self, path: Path, caption: str = "", name: str | None = None) -> None:
        if not Path(path).exists():
            return
        rel = f"img/{name or Path(path).name}"
        (self.out_dir / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.out_dir / rel)
        self.images.append(rel)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.add(f'<figure><img src="{rel}" alt="{html.escape(caption or Path(path).stem)}" loading="lazy">{cap}</figure>')

    def note(self, text: str) -> None:
        self.add(f'<p class="note">{text}</p>')

    def render(self, title: str, subtitle: str) -> str:
        body = "\n".join(self.parts) + ("</section>" if self.toc else "")
        nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.toc)
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
                f"<header><h1>{html.escape(title)}</h1><p>{subtitle}</p></header><nav>{nav}</nav>"
                f"<main>{body}</main></body></html>\n")


def checks_table(d: pd.DataFrame) -> pd.DataFrame:
    """disentanglement.csv for reading: the largest side effect with its attribute, and each
    check with its bootstrap interval in one cell ("0.38 [0.02, 0.65]")."""
    def with_ci(col):
        if f"{col}_ci_low" not in d:
            return [f"{v:.2f}" if pd.notna(v) else "" for v in d[col]]
        return [f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if pd.notna(v) and pd.notna(lo) else (f"{v:.2f}" if pd.notna(v) else "")
                for v, lo, hi in zip(d[col], d[f"{col}_ci_low"], d[f"{col}_ci_high"])]
    return pd.DataFrame({
        "direction": d["direction"], "family": d["family"], "own effect": [f"{v:.2f}" for v in d["own_effect"]],
        "largest side effect": [f"{v:.2f} ({a})" for v, a in zip(d["max_off_diagonal"], d["max_off_attribute"])],
        "own strongest": d["own_is_strongest"].map({True: "yes", False: "no"}),
        "own - largest side [95% CI]": with_ci("own_margin"),
        "side effect vs original [95% CI]": with_ci("off_diagonal_vs_original")})


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def build_report(run_dir, cfg=None) -> Path:
    run_dir = Path(run_dir)
    out = run_dir / "report"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        _write_report(run_dir, cfg, tmp)
        if cfg is not None:
            from pipeline.registry import COMMANDS

            seal_folder(tmp, COMMANDS["report"].identity(cfg))
    return out / "index.html"


def _write_report(run_dir: Path, cfg, tmp: Path) -> None:
    page = Page(tmp)
    manifest = read_manifest(run_dir)
    model = manifest["model"]
    ev = run_dir / "evaluation"

    # ---- overview
    page.section("overview", "Overview")
    summary = json.loads((ev / "summary.json").read_text()) if (ev / "summary.json").exists() else {}
    cards = [("samples", f"{manifest.get('num_samples', '?')}"), ("model", Path(str(model["name_or_path"])).name),
             ("steps T / eta", f"{len(model['timesteps'])} / {sorted(set(model['eta']))}"),
             ("h shape", "x".join(map(str, model["h_shape"])))]
    if summary:
        for key, label in (("disentangled_own_strongest", "disentangled directions whose own effect is strongest"),
                           ("rows_with_lower_max_off_diagonal", "rows whose largest side effect disentangling lowers")):
            if summary.get(key):
                value = "{} of {}".format(*summary[key])
                ci = summary.get(f"{key}_ci")
                if ci:  # how many checks the 95% bootstrap interval confirms, and how many it contradicts
                    value += f" (95% CI: {ci['confirmed']} confirmed, {ci['contradicted']} contradicted)"
                cards.append((label, value))
        if summary.get("pca_effect_per_pixel") is not None:
            cards.append(("consistent attribute change per pixel change: PCA vs random (norm-matched)",
                          f"{summary['pca_effect_per_pixel']:.1f} vs {summary['random_effect_per_pixel']:.1f}"))
        if summary.get("random_pixel_matched_effect_per_pixel") is not None:
            cards.append(("consistent attribute change per pixel change: PCA vs random (pixel-matched)",
                          f"{summary['pca_effect_per_pixel']:.1f} vs {summary['random_pixel_matched_effect_per_pixel']:.1f}"))
    page.add('<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{html.escape(str(v))}</div><div class="k">{html.escape(k)}</div></div>'
        for k, v in cards) + "</div>")
    page.note("Directions in the semantic latent space (h-space, the U-Net bottleneck at every sampling step) found by "
              "PCA, Jacobian subspace iteration, supervised mean differences (eq. 10) and their linear disentanglement "
              "(eq. 11), evaluated on held-out seeds as in Table 1 of Haas et al.")

    # ---- Table 1
    if (ev / "table1.csv").exists():
        page.section("table1", "Table 1: effect of each edit on each attribute")
        table = pd.read_csv(ev / "table1.csv")
        page.note(f"Rows: applied direction; columns: measured attribute ({html.escape(str(summary.get('scorer')))} scorer). "
                  f"Entries: |mean score change| {html.escape(summary.get('unit', ''))}, mean ± std over "
                  f"{summary.get('repeats')} disjoint seed sets of {summary.get('num_samples')} held-out samples, edit "
                  f"scale {summary.get('scale')}. The strongest effect of each row is highlighted.")
        page.add(table1_html(table))
        page.image(ev / "table1.png", "Heatmaps of the same matrices; the strongest effect per row is outlined.")
        page.image(ev / "table1_signed.png", "The same effects with their sign (table1_signed.csv): which way each edit "
                   "moves each attribute. A side effect that disentangling over-corrects changes sign.")
        if (ev / "disentanglement.csv").exists():
            page.add("<h3>Disentanglement checks</h3>")
            d = pd.read_csv(ev / "disentanglement.csv")
            if "own_margin_ci_low" in d:
                page.note("<i>own - largest side</i>: above 0, the own effect is the strongest; <i>side effect vs "
                          "original</i>: the largest side effect minus the original direction's, below 0 when "
                          "disentangling lowered it. In brackets: 95% paired bootstrap interval "
                          f"({summary.get('bootstrap_resamples')} resamples of the seeds; every direction edits the "
                          "same seeds, so differences between rows keep their pairing). A check is confirmed (or "
                          "contradicted) when its interval excludes 0. All columns: <code>evaluation/disentanglement.csv</code>.")
            page.add(df_html(checks_table(d)))
    if (ev / "pca_vs_random.csv").exists():
        page.section("pca-random", "PCA directions against random directions (Fig. 6)")
        pvr = pd.read_csv(ev / "pca_vs_random.csv")
        page.note("Largest consistent attribute effect (|mean change| over all held-out seeds, less its noise floor: "
                  "sqrt(max(mean<sup>2</sup> - var/n, 0)); <i>max_attribute_effect</i> is the uncorrected Table-1 "
                  "value) per unit of mean absolute pixel change, for the top principal directions, "
                  "random directions with the same per-step norms (norm-matched), and the same random directions "
                  "rescaled until they change the images as much as their component (pixel-matched, "
                  "<code>-pixmatch</code>). A semantic direction moves attributes; a random one barely changes the "
                  "image at the same norm and degrades it at the same pixel change.")
        page.add(df_html(pvr))
        page.image(ev / "pca_vs_random.png",
                   "Consistent attribute change per pixel change (left) and against pixel change (right).")
    if (ev / "image_change.csv").exists():
        page.section("quality", "Image change and quality per edit")
        page.note("Mean absolute pixel change (in [0, 1] units) and the image-quality score before and after the edit "
                  "(MTCNN face probability for faces; the render error of the toy domain, lower is better), so that a "
                  "direction that 'works' by destroying the image is visible.")
        page.add(df_html(pd.read_csv(ev / "image_change.csv", index_col=0), index=True))

    from evaluation.dose import report_section as dose_response_section  # calibrated Table 1, dose-response, auto, strips

    dose_response_section(page, run_dir)

    # ---- directions
    dirs = run_dir / "directions"
    if (dirs / "explained_variance.png").exists():
        page.section("pca", "PCA of h")
        page.image(dirs / "explained_variance.png", "Explained variance ratio of the leading components at every step.")
    edits = run_dir / "edits"
    families = [("pca", "PCA directions (scale in standard deviations)"), ("pca_random", "Random directions, norm-matched"),
                ("jacobian", "Jacobian directions (Alg. 1): image-specific, applied to other seeds"),
                ("supervised", "Supervised directions (eq. 10)"), ("disentangled", "Disentangled directions (eq. 11)"),
                ("supervised_xT", "The same supervised directions in x_T space (Fig. 8 baseline)"),
                ("real", "Real-image directions")]
    present = [(f, t) for f, t in families if (edits / f).is_dir() and any((edits / f).glob("*.png"))]
    if present:
        page.section("edits", "Edit strips")
        page.note("Rows: held-out seeds; columns: edit scale (0 = unedited).")
        for fam, title in present:
            page.add(f"<h3>{html.escape(title)}</h3><div class=\"grid\">")
            captions = strip_captions(dirs, fam)
            for png in sorted((edits / fam).glob("*.png")):
                page.image(png, captions.get(png.stem, png.stem), name=f"edit-{fam}-{png.name}")
            page.add("</div>")
    add_sections(page, run_dir)  # probes, Fig. 8 as effect against n, probe-step restriction (evaluation/semantics.py)
    sheets = sorted((run_dir / "contact_sheets").glob("*.png"))
    if sheets:
        page.section("annotators", "Annotator contact sheets")
        page.note("The most and least extreme samples of every selected attribute, with their scores: check the annotator "
                  "by eye before trusting a supervised direction.")
        page.add('<div class="grid">')
        for png in sheets:
            page.image(png, png.stem, name=f"sheet-{png.name}")
        page.add("</div>")

    _costs_section(page, run_dir)

    # ---- provenance
    page.section("provenance", "Configuration and provenance")
    prov = {"created": dt.datetime.now().isoformat(timespec="seconds"), "hspace commit": git_commit(),
            "model": model.get("name_or_path"), "weights fingerprint": model.get("weights_fingerprint"),
            "scheduler": model.get("scheduler"), "timesteps": model.get("timesteps"), "eta": model.get("eta"),
            "hook": model.get("hook"), "samples identity": (manifest.get("record") or {}).get("id"),
            "packages": manifest.get("packages")}
    page.add("<table><tbody>" + "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:left'>"
                                        f"<code>{html.escape(json.dumps(v) if not isinstance(v, str) else v)}</code></td></tr>"
                                        for k, v in prov.items()) + "</tbody></table>")
    if cfg is not None:
        page.add("<details><summary>Full configuration (conf.yaml as resolved)</summary><pre>"
                 f"{html.escape(to_yaml(cfg))}</pre></details>")
    title = "hspace report"
    subtitle = html.escape(f"{run_dir.resolve()} · {dt.datetime.now():%Y-%m-%d %H:%M}")
    (tmp / "index.html").write_text(page.render(title, subtitle))


def _costs_section(page: Page, run_dir: Path) -> None:
    table = costs_html(run_dir)
    if table:
        page.section("costs", "Where the time went")
        page.add(table)


def strip_captions(dirs: Path, family: str) -> dict[str, str]:
    """Edit-strip file stem -> its direction's name with the label a user gave it ("pc3: hat")."""
    from pipeline.formats.directions import load_directions
    from pipeline.stages.edit import safe_name

    stem = {"supervised_xT": "supervised"}.get(family, family)
    path = dirs / f"{stem}.safetensors"
    if not path.exists():
        return {}
    d = load_directions(path)
    suffix = "-xT" if family == "supervised_xT" else ""
    return {safe_name(n) + suffix: d.display_name(i) for i, n in enumerate(d.names) if i in d.labels}


def run_report(cfg) -> Path:
    from pipeline.registry import COMMANDS

    for name in COMMANDS["report"].read_names(cfg):  # what it shows is what the run holds now
        verify(cfg.run_dir, name)
    path = build_report(cfg.run_dir, cfg)
    print(f"hspace report: {path}")
    return path
