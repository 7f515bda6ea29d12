"""The commands a user meets first: per-stage help (keys, defaults, an example, read from the schema),
`hspace config` naming the file it read, `hspace sample`'s checks, labels and output place, and the
figure style every stage draws in."""
from __future__ import annotations

import pytest
import torch
import yaml
from PIL import Image

from conftest import hspace, tiny_overrides
from pipeline import cli
from pipeline.config import HSpaceConfig, load_config, to_dict
from pipeline.errors import ConfigError


@pytest.mark.parametrize("command", sorted(cli.commands()))
def test_every_command_has_help_with_its_keys_defaults_and_an_example(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    sections, example = cli.USAGE[command]  # every command has an entry (a new one must add it)
    assert f"example:\n  {example}" in text and example.startswith(f"hspace {command}")
    for section in sections:
        head, _, key = section.partition(".")
        model = HSpaceConfig.model_fields[head].annotation
        fields = {key: model.model_fields[key]} if key and "." not in key else \
            ({} if key else model.model_fields)
        for name, info in fields.items():
            if hasattr(info.annotation, "model_fields"):
                continue  # a nested section: its own keys are listed
            default = yaml.safe_dump(info.get_default(call_default_factory=True), default_flow_style=True,
                                     width=10**6).strip().removesuffix("...").strip()
            assert f"  {head}.{name} = {default}\n" in text, (command, name)
    if command == "select":
        assert "select.confound_threshold = 0.5" in text and "select.n = 50" in text
    if command == "supervised":
        assert "supervised.real.fixed_point_iterations = 1" in text  # nested sections too


def test_config_says_which_file_it_read(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["config", "evaluate.scale=2"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first == "# hspace config: no configuration file (./conf.yaml absent): the built-in defaults, then 1 " \
                    "override(s): evaluate.scale=2"
    assert yaml.safe_load(out) == to_dict(load_config(None, ["evaluate.scale=2"]))  # still a configuration file
    (tmp_path / "mine.yaml").write_text("select:\n  n: 7\n")
    assert cli.main(["config", "--config", "mine.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"# hspace config: read mine.yaml ({tmp_path / 'mine.yaml'})"
    assert yaml.safe_load(out)["select"]["n"] == 7


def test_sample_refuses_a_direction_without_a_file_and_takes_short_names(tmp_path):
    from pipeline.formats.directions import Directions, save_directions
    from pipeline.stages.sample import check, output_path

    def cfg(*overrides):
        return load_config(None, [f"run_dir={tmp_path / 'run'}", *overrides])

    assert check(cfg()) is None and output_path(cfg()).name == "sample.png"
    assert output_path(cfg()).parent == type(output_path(cfg()))(".")  # no run directory: ./sample.png
    with pytest.raises(ConfigError, match="sample.directions is not set"):
        check(cfg("sample.direction=smile"))
    with pytest.raises(ConfigError, match="sample.directions is not set"):
        check(cfg("sample.scales=[-3,0,3]"))
    with pytest.raises(ConfigError, match=r"supervised\.safetensors does not exist"):
        check(cfg("sample.directions=supervised", "sample.direction=smile"))
    path = tmp_path / "run" / "directions" / "supervised.safetensors"
    save_directions(Directions(torch.zeros(1, 2, 4, 1, 1), ["smile"], "supervised", [10, 5]), path)
    assert check(cfg("sample.directions=supervised", "sample.direction=smile")) == path  # as `hspace edit` reads it
    assert output_path(cfg()) == tmp_path / "run" / "sample.png"  # the run directory exists now


@pytest.mark.slow
def test_sample_writes_a_labelled_grid_and_no_run_directory(tmp_path, tiny_model_dir):
    """A plain `hspace sample` outside a project writes ./sample.png and creates no runs/ folder; with a
    directions file (a short name) the grid is labelled and edited."""
    from pipeline.formats.directions import Directions, save_directions
    from pipeline.formats.figures import MIN_FONT_KEY

    out = hspace("sample", *tiny_overrides("runs/demo", tiny_model_dir)[1:], "sample.seeds=[0,1,2]", cwd=tmp_path)
    assert "hspace sample: wrote sample.png (3 seeds)" in out.stdout
    assert (tmp_path / "sample.png").is_file() and not (tmp_path / "runs").exists()
    run = tmp_path / "run"
    save_directions(Directions(torch.randn(1, 3, 16, 8, 8), ["smile"], "supervised", [666, 333, 0]),
                    run / "directions" / "supervised.safetensors")
    out = hspace("sample", *tiny_overrides(run, tiny_model_dir), "sample.seeds=[0,1]", "sample.directions=supervised",
                 "sample.direction=smile", "sample.scales=[-2,0,2]", cwd=tmp_path)
    assert f"wrote {run / 'sample.png'} (2 seeds x 3 scales)" in out.stdout
    with Image.open(run / "sample.png") as im:
        assert float(im.info[MIN_FONT_KEY]) >= 10 and im.size[0] > 3 * 85
    refused = hspace("sample", *tiny_overrides(run, tiny_model_dir), "sample.direction=smile", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "sample.directions is not set" in refused.stderr


def test_figures_record_their_smallest_font(tmp_path):
    """save_figure writes the smallest font size into the PNG; the shared style's is FONT_PT."""
    import numpy as np

    from pipeline.formats.figures import DPI, FONT_PT, MIN_FONT_KEY, image_grid_figure, plt, save_figure, scale_labels

    fig = image_grid_figure(np.zeros((2, 3, 8, 8, 3), np.uint8), ["seed 1", "seed 2"], scale_labels([-1.0, 0.0, 0.5], 0.5))
    with Image.open(save_figure(fig, tmp_path / "grid.png")) as im:
        assert float(im.info[MIN_FONT_KEY]) == FONT_PT and round(im.info["dpi"][0]) == DPI
    fig, ax = plt.subplots()
    ax.set_title("small", fontsize=6)  # drawn outside the style: recorded as it is
    with Image.open(save_figure(fig, tmp_path / "small.png")) as im:
        assert float(im.info[MIN_FONT_KEY]) == 6
    assert scale_labels([-1.0, 0.0, 0.5, 1.0, 3.0], 0.5, 3.0) == ["-2×\n(-1)", "unedited", "+1× cal.\n(+0.5)", "+2×\n(+1)",
                                                                  "fixed\n(+3)"]
    assert scale_labels([3.0], 3.0, 3.0) == ["+1× cal. = fixed\n(+3)"] and scale_labels([-4.0], unit=" SD") == ["-4 SD"]


def test_an_image_grid_shows_every_image_unchanged_in_its_cell_with_its_labels():
    """image_grid_figure pastes each image, pixel for pixel, into one mosaic; a missing cell stays white; the
    row and column labels sit at the cells' centres and the cell titles above each image."""
    import numpy as np

    from pipeline.formats.figures import image_grid_figure, plt

    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 255, (8, 6, 3), dtype=np.uint8) for _ in range(3)],
              [rng.integers(0, 255, (8, 6, 3), dtype=np.uint8), None]]
    fig = image_grid_figure(images, ["a", "b"], ["x", "y", "z"], cell_titles=[["1", "2", "3"], ["4", "5"]])
    (ax,) = fig.axes
    mosaic = np.asarray(ax.images[0].get_array())
    cols = [round(x - 2.5) for x in ax.get_xticks()]
    rows = [round(y - 3.5) for y in ax.get_yticks()]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"] and len(set(np.diff(cols))) == 1
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"] and rows[1] - rows[0] > 8
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            cell = mosaic[rows[r]:rows[r] + 8, cols[c]:cols[c] + 6]
            assert (cell == (255 if image is None else image)).all(), (r, c)
    titles = sorted((t.get_text(), t.get_position()) for t in ax.texts)
    assert [t for t, _ in titles] == ["1", "2", "3", "4", "5"]
    assert all(y < rows[int(t) > 3] for t, (_, y) in titles)  # above its image (the y axis points down)
    plt.close(fig)


@pytest.mark.parametrize("command, resumes", [("explore", False), ("select", True)])
def test_an_interrupted_command_says_resume_only_when_it_does(command, resumes, tmp_path, monkeypatch, capsys):
    from pipeline import registry
    from pipeline.errors import Interrupted

    def interrupted(cfg, **kwargs):
        raise Interrupted("SIGINT")

    real = cli.commands
    monkeypatch.setattr(cli, "commands", lambda: {**real(), command: (interrupted, real()[command][1])})
    monkeypatch.setattr(registry.Stage, "check_reads", lambda self, cfg: None)  # interrupted as if its inputs were there
    assert cli.main([command, f"run_dir={tmp_path / 'run'}"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"hspace {command}: interrupted" + ("; re-run the same command to resume" if resumes else "")
