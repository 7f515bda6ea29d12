"""The import graph follows the layers of docs/design.md (import-linter contracts in pyproject.toml)."""
from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(monkeypatch, capsys):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert code == 0, capsys.readouterr().out[-3000:]


def test_every_pipeline_module_has_a_layer():
    """A new module under pipeline/ must be placed in the layers contract, or nothing checks it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {re.sub(r"[()]", "", m).strip() for layer in layers for m in layer.split(":")}
    named = {m for n in named for m in n.split("|")}
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "pipeline").glob("**/*.py")}
    modules = {m.removesuffix(".__init__") for m in modules}
    covered = {m for m in modules if any(m == n or m.startswith(n + ".") for n in named)}
    assert modules - covered == {"pipeline", "pipeline.stages"}
