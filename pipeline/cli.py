"""`hspace <stage> [--config conf.yaml] [key=value ...]`: the command-line entry point.

``key`` is a dotted path into conf.yaml (``generate.num_samples=1000``). Without
``--config``, ./conf.yaml is used when it exists, else the built-in defaults. Problems the
user can fix (bad config, missing model, corrupt data) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .errors import HSpaceError

#: stage name -> ("module:function", help). Each function takes the validated config.
STAGES: dict[str, tuple[str, str]] = {
    "run": ("pipeline.stages.run:run_all", "the main job: every stage in order"),
    "generate": ("pipeline.stages.generate:run_generate", "generate samples with h trajectories into a sharded dataset"),
    "annotate": ("pipeline.stages.annotate:run_annotate", "score every sample with the configured annotators"),
    "select": ("pipeline.stages.select:run_select", "top/bottom n samples per attribute, with contact sheets"),
    "pca": ("pipeline.stages.pca:run_pca", "per-step PCA of h (streamed, multi-process) -> directions/pca.safetensors"),
    "jacobian": ("pipeline.stages.jacobian:run_jacobian", "image-specific directions by Jacobian subspace iteration"),
    "supervised": ("pipeline.stages.supervised:run_supervised", "supervised directions (eq. 10) from the selection"),
    "disentangle": ("pipeline.stages.disentangle:run_disentangle", "remove projections onto other directions (eq. 11)"),
    "edit": ("pipeline.stages.edit:run_edit", "grids of samples x scales for a directions file"),
    "evaluate": ("evaluation.stage:run_evaluate", "Table 1: effects of every edit on every attribute, held-out seeds"),
    "figures": ("pipeline.stages.figures:run_figures", "edit strips of every direction family for the report"),
    "report": ("evaluation.report:run_report", "write <run_dir>/report/index.html"),
    "sample": ("pipeline.stages.sample:run_sample", "write a PNG grid of seeds, optionally edited"),
    "train-toy": ("pipeline.toyfaces.train_ddpm:run_train_toy", "train the embedded default DDPM on toy faces"),
    "finetune-toy": ("pipeline.toyfaces.train_ddpm:run_finetune_toy", "phase 2 of the embedded default: fine-tune with skip dropout"),
    "train-toy-annotator": ("annotators.toy:run_train_toy_annotator", "train the toy-face annotator"),
    "validate-toy": ("pipeline.toyfaces.validate:run_validate_toy", "check the embedded default against its ground truth"),
    "explore": ("pipeline.explore.app:run_explore", "a local web app: sliders over the run's directions, naming, export"),
    "config": ("pipeline.cli:print_config", "print the resolved configuration"),
}
#: the commands that run Lightning Trainers (every rank of a multi-process job takes part): `run` and the
#: stages marked ``distributed`` in pipeline.stages.run.STAGES (not imported here: it loads Lightning; a test
#: keeps the two lists equal)
DISTRIBUTED = ("run", "generate", "annotate", "pca", "jacobian", "evaluate")


def print_config(cfg) -> None:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(cfg, resolve=True), end="")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hspace",
        description="Discover, apply and evaluate editing directions in the h-space of diffusion models.",
        epilog="Example: hspace generate run_dir=runs/x generate.num_samples=1000 trainer.devices=2",
    )
    sub = p.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, (_, help_) in STAGES.items():
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--config", "-c", default=None, help="YAML config (default: ./conf.yaml if present)")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        if name == "explore":
            s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
            s.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .config import load_config

    try:
        path = args.config if args.config is not None else ("conf.yaml" if Path("conf.yaml").exists() else None)
        cfg = load_config(path, args.overrides)
        if args.stage in DISTRIBUTED:
            from .stages.lightning_utils import join_launched_ranks

            join_launched_ranks(cfg.trainer)
        module, func = STAGES[args.stage][0].split(":")
        options = {"host": args.host, "port": args.port} if args.stage == "explore" else {}
        getattr(importlib.import_module(module), func)(cfg, **options)
    except HSpaceError as e:
        print(f"hspace {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hspace {args.stage}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
