"""The report's page: a small HTML builder that copies every figure and data file it shows into the
report folder, so that the folder is complete on its own (open ``index.html`` from disk, zip it).

Figures go to ``img/`` and are shown at their natural size (one PNG pixel per CSS pixel; they are
drawn for the page's width, :mod:`pipeline.formats.figures`), each a link to the PNG itself; data
files (CSV, Parquet, JSON, YAML) go to ``data/`` and every mention of one on the page is a link to
its copy (:meth:`Page.data`). The sticky navigation bar is measured on load so that a followed
link lands below it.
"""
from __future__ import annotations

import html
import shutil
from pathlib import Path

CSS = """
:root { --ink:#1d232b; --muted:#4f5964; --line:#e3e7ec; --accent:#2f6fdf; --bg:#f7f8fa; --good:#1a7f37; --bad:#b3261e;
        --warn:#fff4e5; --warnline:#f0b45b; }
* { box-sizing: border-box; }
html { scroll-padding-top: 5.5rem; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:#1d232b; color:#fff; padding:24px 32px 18px; }
header h1 { margin:0 0 4px; font-size:24px; font-weight:600; }
header p { margin:0; color:#c5ccd5; font-size:14px; overflow-wrap:anywhere; }
nav { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--line); padding:6px 32px;
      font-size:14px; display:flex; flex-wrap:wrap; gap:2px 16px; }
nav a { color:var(--muted); text-decoration:none; white-space:nowrap; }
nav a:hover { color:var(--accent); }
main { max-width:1280px; margin:0 auto; padding:8px 24px 60px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:16px 22px; margin:20px 0; }
h2 { font-size:20px; margin:0 0 10px; }
h3 { font-size:16px; margin:20px 0 8px; color:var(--muted); font-weight:600; }
p.to-come { color:var(--muted); font-style:italic; border-left:3px solid var(--line); padding-left:10px; }
p.note { color:var(--muted); font-size:14px; margin:6px 0 12px; max-width:62em; }
.warn { background:var(--warn); border:1px solid var(--warnline); border-radius:6px; padding:8px 12px; margin:8px 0 12px; }
.table-wrap { max-width:100%; overflow-x:auto; }
table { border-collapse:collapse; font-size:14px; margin:8px 0 14px; }
th, td { border-bottom:1px solid var(--line); padding:4px 9px; text-align:right; white-space:nowrap; }
th { white-space:normal; vertical-align:bottom; }
th:first-child, td:first-child { text-align:left; }
thead th { background:#f1f3f6; font-weight:600; }
tr.section td { background:#fafbfc; font-style:italic; color:var(--muted); text-align:left; }
td.best { font-weight:700; background:#fff4e5; }
td.noise, td.noise .pm { color:#9aa3ad; }
td.over { background:#fde2df; font-weight:600; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin:6px 0 12px; }
.card { border:1px solid var(--line); border-radius:8px; padding:10px 14px; min-width:180px; max-width:100%; background:#fcfcfd; }
.card .v { font-size:20px; font-weight:600; }
.card .k { font-size:13px; color:var(--muted); }
.ok { color:var(--good); } .no { color:var(--bad); }
.figs { display:flex; flex-wrap:wrap; gap:10px 22px; align-items:flex-start; }
figure { margin:10px 0 16px; max-width:100%; }
figure img { display:block; max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; background:#fff; }
figure a { display:inline-block; max-width:100%; }
figcaption { font-size:14px; color:var(--muted); margin-top:4px; max-width:62em; }
details { margin:8px 0; } summary { cursor:pointer; color:var(--accent); }
pre { background:#f6f8fa; border:1px solid var(--line); border-radius:6px; padding:10px; font-size:13px; overflow:auto;
      max-height:420px; white-space:pre-wrap; overflow-wrap:anywhere; }
code { font-size:13.5px; overflow-wrap:anywhere; }
.pm { color:#6b7580; font-size:13px; }
"""

#: sets the scroll padding to the navigation bar's height, so that a followed link lands below it
NAV_SCRIPT = ("<script>(function(){var n=document.querySelector('nav');function f(){document.documentElement.style"
              ".scrollPaddingTop=(n.offsetHeight+12)+'px';}f();window.addEventListener('resize',f);})();</script>")


class Page:
    """Sections of HTML, the images and data files they show (copied into ``out_dir``), a table of contents."""

    def __init__(self, out_dir: Path, pending: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.pending = dict(pending or {})  # artefact -> the stage of the run still to make it
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.files: dict[str, Path] = {}  # data/<name> -> the run's file it copies

    def add(self, s: str) -> None:
        self.parts.append(s)

    def section(self, anchor: str, title: str, short: str | None = None) -> None:
        """Start a section; ``short``: its name in the navigation bar (default the title)."""
        if self.toc:
            self.add("</section>")
        self.toc.append((anchor, short or title))
        self.add(f'<section id="{anchor}"><h2>{html.escape(title)}</h2>')

    def still_to_come(self, artefact: str, what: str) -> bool:
        """When ``artefact`` is pending: a note in the current section that ``what`` is still to come and which
        stage makes it (True); else nothing (False)."""
        stage = self.pending.get(artefact)
        if stage is not None:
            self.note(f"Still to come: {what} (<code>hspace {html.escape(stage)}</code>).")
        return stage is not None

    def to_come(self, artefact: str, anchor: str, title: str, short: str | None = None) -> bool:
        """When ``artefact`` is pending: its section, saying it is still to come and which stage makes it
        (True); else nothing (False)."""
        stage = self.pending.get(artefact)
        if stage is None:
            return False
        self.section(anchor, title, short)
        self.add(f'<p class="to-come">Still to come: the <code>{html.escape(stage)}</code> stage of this '
                 f'<code>hspace run</code> (<code>hspace {html.escape(stage)}</code> on its own) writes '
                 f'<code>{html.escape(artefact)}/</code>; this page is rendered again when it lands.</p>')
        return True

    def image(self, path: Path, caption: str = "", name: str | None = None, alt: str | None = None) -> None:
        """A figure at its natural size, a link to the PNG; ``caption`` is HTML."""
        path = Path(path)
        if not path.exists():
            return
        rel = f"img/{name or path.name}"
        (self.out_dir / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.out_dir / rel)
        self.images.append(rel)
        width, height = _png_size(path)
        size = f' width="{width}" height="{height}"' if width else ""
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        text = html.escape(alt or _strip_tags(caption) or path.stem, quote=True)
        self.add(f'<figure><a href="{rel}" target="_blank" rel="noopener" title="open at full size">'
                 f'<img src="{rel}"{size} alt="{text}" loading="lazy"></a>{cap}</figure>')

    def data(self, path: Path, name: str | None = None) -> str:
        """Copy a data file of the run into ``data/`` and return the link that names it ("" if it is missing)."""
        path = Path(path)
        if not path.exists():
            return ""
        name = name or path.name
        (self.out_dir / "data").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.out_dir / "data" / name)
        self.files[name] = path
        return f'<a href="data/{html.escape(name)}"><code>{html.escape(name)}</code></a>'

    def write_data(self, name: str, text: str) -> str:
        """Write ``text`` as ``data/<name>`` and return the link that names it."""
        (self.out_dir / "data").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "data" / name).write_text(text)
        self.files[name] = self.out_dir / "data" / name
        return f'<a href="data/{html.escape(name)}"><code>{html.escape(name)}</code></a>'

    def table(self, table_html: str) -> None:
        """A table that scrolls inside its section rather than widening the page."""
        self.add(f'<div class="table-wrap">{table_html}</div>')

    def note(self, text: str) -> None:
        self.add(f'<p class="note">{text}</p>')

    def warning(self, text: str) -> None:
        self.add(f'<div class="warn">{text}</div>')

    def render(self, title: str, subtitle: str) -> str:
        body = "\n".join(self.parts) + ("</section>" if self.toc else "")
        nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.toc)
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
                f"<header><h1>{html.escape(title)}</h1><p>{subtitle}</p></header><nav>{nav}</nav>"
                f"<main>{body}</main>{NAV_SCRIPT}</body></html>\n")


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError:
        return 0, 0


def _strip_tags(text: str) -> str:
    import re

    return re.sub(r"<[^>]+>", "", text)
