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


def layered_modules(contract: dict) -> set[str]:
    """The modules a layers contract names (containers prefixed)."""
    named = {re.sub(r"[()]", "", m).strip() for layer in contract["layers"] for m in re.split(r"[:|]", layer)}
    return {f"{c}.{m}" for c in contract.get("containers", [""]) for m in named} if contract.get("containers") \
        else named


def modules_under(package: str) -> set[str]:
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / package).glob("**/*.py")}
    return {m.removesuffix(".__init__") for m in modules}


def test_every_pipeline_and_evaluation_module_has_a_layer():
    """A new module under pipeline/ or evaluation/ must be placed in a layers contract, or nothing checks it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = set().union(*(layered_modules(c) for c in config["contracts"] if c["type"] == "layers"))
    # pipeline.testing is for tests and benchmarks: a forbidden contract keeps the pipeline from importing it
    testing = {"pipeline.testing", *(m for m in modules_under("pipeline") if m.startswith("pipeline.testing."))}
    for package, unplaced in (("pipeline", {"pipeline", "pipeline.stages", *testing}), ("evaluation", {"evaluation"})):
        modules = modules_under(package)
        covered = {m for m in modules if any(m == n or m.startswith(n + ".") for n in named if n != package)}
        assert modules - covered == unplaced, package


def test_the_design_notes_name_every_module():
    """docs/design.md names every module of the four packages (in backticks: `name`, `package.name` or a path)."""
    text = (ROOT / "docs" / "design.md").read_text()
    named = {token for span in re.findall(r"`([^`]+)`", text) for token in re.split(r"[^\w]+", span)}
    modules = {p.stem for package in ("pipeline", "evaluation", "annotators", "toyfaces")
               for p in (ROOT / package).glob("**/*.py") if p.stem != "__init__"}
    assert sorted(modules - named) == []
