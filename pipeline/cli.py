"""`hspace <stage> [--config conf.yaml] [key=value ...]`: the command-line entry point.

``key`` is a dotted path into conf.yaml (``generate.num_samples=1000``). Without
``--config``, ./conf.yaml is used when it exists, else the built-in defaults. Problems the
user can fix (bad config, missing model, corrupt data) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from pipeline.cost import measured
from pipeline.errors import HSpaceError, Interrupted
from pipeline.io import writing
from pipeline.process import passive_openmp_waits
from pipeline.registry import COMMANDS, DISTRIBUTED, STAGES

STAGE_NAMES = frozenset(st.name for st in STAGES)


def run(cfg):
    from pipeline.stages.run import run_all

    return run_all(cfg)


def print_config(cfg) -> None:
    """Print the resolved configuration, once every check that needs no data has passed."""
    from annotators.base import check_columns
    from pipeline.config import to_yaml

    check_columns(cfg)
    print(to_yaml(cfg), end="")


def commands() -> dict:
    """name -> (function taking the config, help): `run`, every registered stage and tool, `config`."""
    return {"run": (run, "the main job: every stage in order"),
            **{name: (st.run, st.help) for name, st in COMMANDS.items()},
            "config": (print_config, "print the resolved configuration")}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line and exit status 2, as every other problem the user can fix."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    """--port: 0 (any free port) or 1-65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 1-65535, or 0 for any free one")
    return port


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="hspace",
        description="Discover, apply and evaluate editing directions in the h-space of diffusion models.",
        epilog="Example: hspace generate run_dir=runs/x generate.num_samples=1000 trainer.devices=2",
    )
    sub = p.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, (_, help_) in commands().items():
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--config", "-c", default=None, help="YAML config (default: ./conf.yaml if present)")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        if name == "config":
            s.add_argument("--defaults", action="store_true", help="print the defaults as conf.yaml, with comments")
        if name == "explore":
            s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
            s.add_argument("--port", type=_port, default=7860, help="port (default 7860; 0: any free one)")
    return p


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    passive_openmp_waits()  # before anything imports torch
    args = _parser().parse_args(argv)
    from pipeline.config import defaults_yaml, load_config
    from pipeline.io import launching_rank

    if getattr(args, "defaults", False):
        print(defaults_yaml(), end="")
        return 0

    # SIGINT and SIGTERM end the command through one exception that every ``finally`` and every
    # temporary file sees; not KeyboardInterrupt, which Lightning turns into a silent exit(1).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)
    rank0 = launching_rank() == 0
    try:
        path = args.config if args.config is not None else ("conf.yaml" if Path("conf.yaml").exists() else None)
        cfg = load_config(path, args.overrides)
        if args.stage == "run":
            from pipeline.stages.run import check_plan

            check_plan(cfg)  # run.skip, and what the stages need: before the run directory's lock is taken
        if args.stage in DISTRIBUTED:
            from pipeline.stages.lightning_utils import check_trainer, join_launched_ranks

            check_trainer(cfg.trainer)  # settings that cannot work: refused before anything is written
            join_launched_ranks(cfg.trainer)
        command = commands()[args.stage][0]
        if args.stage == "config":
            command(cfg)
        else:
            options = {"host": args.host, "port": args.port} if args.stage == "explore" else {}
            # a main-job stage run on its own records its cost too (`run` records each of its stages)
            timed = measured(cfg.run_dir, args.stage, rank0, args.stage in DISTRIBUTED) if args.stage in STAGE_NAMES \
                else contextlib.nullcontext()
            # one writer per run directory; readers (edit and sample writing elsewhere, explore until it saves) take nothing
            writes = args.stage == "run" or COMMANDS[args.stage].writes_run_dir(cfg)
            with writing(cfg.run_dir, args.stage, rank0) if writes else contextlib.nullcontext(), timed:
                command(cfg, **options)
    except HSpaceError as e:
        print(f"hspace {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        if rank0:
            print(f"hspace {args.stage}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Close the process group a multi-process command formed: left to the interpreter's exit, gloo's
    threads are destroyed while still running and the process aborts ("terminate called without an
    active exception") after its work is done."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group (and no torch import for it)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
