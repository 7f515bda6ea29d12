"""README.md and docs/*.md name only files that exist: relative links, repository paths in
backticks, and anchors within the same page."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: backticked paths starting with these are repository paths (run-directory paths start with runs/)
REPO_DIRS = ("pipeline/", "annotators/", "evaluation/", "toyfaces/", "bench/", "tests/", "docs/", ".ci/")
REPO_FILE = re.compile(r"[\w.-]+\.(ya?ml|toml|txt|py|md)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_references(page: Path) -> list[str]:
    text = page.read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
            bad.append(f"link {target}")
    for path in re.findall(r"`([^`\s]+)`", prose):
        path = path.rstrip(",.;:")
        if (path.startswith(REPO_DIRS) or REPO_FILE.fullmatch(path)) and not re.search(r"[<*]", path) \
                and not (ROOT / path).exists():
            bad.append(f"path `{path}`")
    anchors = {anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}
    bad += [f"anchor #{a}" for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in anchors]
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_only_existing_files(page):
    assert broken_references(page) == []


def test_the_check_finds_a_missing_file(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [a](missing.md), `pipeline/nowhere.py`, [b](#title) and [c](#nothing).\n")
    assert broken_references(page) == ["link missing.md", "path `pipeline/nowhere.py`", "anchor #nothing"]


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.mark.slow
def test_the_readme_core_api_runs(tmp_path, monkeypatch):
    """The README's first Python block as written, on a small run directory (two generated samples and
    a directions file named as the demo's); a tiny random U-Net of the embedded default's image size
    stands in for `toyfaces` (the same calls, seconds instead of minutes)."""
    from diffusers import DDPMScheduler

    from conftest import make_tiny_unet
    from pipeline import Directions, HSpaceModel, save_directions
    from pipeline.config import load_config
    from pipeline.stages.generate import run_generate

    model_dir = tmp_path / "tiny"
    make_tiny_unet(size=32).save_pretrained(model_dir)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(model_dir)
    run = tmp_path / "runs" / "demo"
    run_generate(load_config(None, [f"run_dir={run}", f"model.name_or_path={model_dir}", "model.num_inference_steps=20",
                                    "generate.num_samples=2", "trainer.accelerator=cpu"]))
    model = HSpaceModel.from_pretrained(model_dir, num_inference_steps=20)
    h = model.sample(seeds=[0]).h
    save_directions(Directions(h, ["smile"], "supervised", model.timesteps.tolist()),
                    run / "directions" / "supervised.safetensors")
    block = readme_python_blocks()[0]
    assert 'from_pretrained("toyfaces"' in block
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait for each other
    try:
        exec(block.replace('"toyfaces"', repr(str(model_dir)), 1), scope)
    finally:
        torch.set_num_threads(threads)
    assert scope["smiling"].images.shape == (2, 3, 32, 32) and scope["h0"].shape == h.shape[1:]
    assert scope["decoded"].images.shape == scope["out"].images.shape and scope["smiling0"].images.shape == (1, 3, 32, 32)
    # the seed of a stored sample gives it back (h stored as float16)
    torch.testing.assert_close(scope["again"].h[0], scope["h0"].float(), rtol=1e-2, atol=2e-3)


def test_the_readme_stage_table_names_every_command_and_its_module():
    """README's stage table has a row for every command of the registry (and `run`, `config`), whose
    code column names the file (or the folder holding the file) of the command's function."""
    from pipeline.cli import commands
    from pipeline.registry import COMMANDS

    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Stages\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| `")]
    entries = {name: st.entry.split(":")[0] for name, st in COMMANDS.items()}
    entries |= {"run": "pipeline.stages.run", "config": "pipeline.cli"}
    assert set(entries) == set(commands())
    for name, module in entries.items():
        file = Path(*module.split(".")).with_suffix(".py")
        places = {str(file), *(f"{p}/" for p in file.parents if p != Path("."))}
        row = next((r for r in rows if f"`{name}`" in r[0]), None)
        assert row is not None, f"no README row for `{name}`"
        assert any(f"`{p}`" in row[-1] for p in places), f"`{name}`: README names neither {file} nor its folder"
