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
from pipeline.process import passive_openmp_waits, record_command
from pipeline.registry import COMMANDS, DISTRIBUTED, STAGES

STAGE_NAMES = frozenset(st.name for st in STAGES)

#: command -> (the configuration sections it reads besides run_dir, model and trainer; one example)
USAGE = {
    "run": (("run",), "hspace run run_dir=runs/x generate.num_samples=1000 run.skip=[probe,fewshot]"),
    "generate": (("generate",), "hspace generate run_dir=runs/big generate.num_samples=10000 trainer.devices=8"),
    "annotate": (("annotate",), "hspace annotate annotate.annotators=[toy,clip] annotate.options.clip.prompts=celeba40"),
    "select": (("select",), "hspace select select.n=100 select.attributes=[smile,hat] select.confound_threshold=1"),
    "probe": (("probe",), "hspace probe probe.spaces=[h] probe.num_samples=256"),
    "pca": (("pca",), "hspace pca pca.n_components=25 pca.method=randomized"),
    "jacobian": (("jacobian",), "hspace jacobian jacobian.sample_ids=[0,1,2] jacobian.k=4"),
    "supervised": (("supervised",), "hspace supervised supervised.method=logistic supervised.restrict_steps=true"),
    "disentangle": (("disentangle", "calibrate"), "hspace disentangle disentangle.pairs=auto"),
    "fewshot": (("fewshot",), "hspace fewshot fewshot.ns=[1,5,20] fewshot.draws=5"),
    "figures": (("report", "edit"), "hspace figures edit.seeds=[1000000,1000001] report.jacobian_directions=3"),
    "calibrate": (("calibrate",), "hspace calibrate calibrate.target=0.5 calibrate.num_samples=16"),
    "evaluate": (("evaluate",), "hspace evaluate evaluate.scale=2 evaluate.repeats=5"),
    "evaluate-calibrated": (("evaluate", "calibrate"), "hspace evaluate-calibrated evaluate.sweep_multiples=[-3,-1,1,3]"),
    "report": (("report",), "hspace report run_dir=runs/demo"),
    "edit": (("edit",), "hspace edit edit.directions=supervised edit.names=[smile] edit.scales=[-3,0,3]"),
    "sample": (("sample",), "hspace sample sample.directions=supervised sample.direction=smile sample.scales=[-3,0,3]"),
    "explore": (("evaluate.scorer", "supervised.real.fixed_point_iterations"), "hspace explore run_dir=runs/demo --port 7861"),
    "sae": (("sae",), "hspace sae sae.feed=token sae.num_latents=2048 sae.k=16 trainer.devices=2"),
    "train-toy": (("train_toy",), "hspace train-toy train_toy.steps=2000 train_toy.out_dir=runs/my-toy"),
    "finetune-toy": (("finetune_toy",), "hspace finetune-toy finetune_toy.steps=1000"),
    "train-toy-annotator": (("train_toy_annotator",), "hspace train-toy-annotator train_toy_annotator.steps=2000"),
    "validate-toy": ((), "hspace validate-toy model.name_or_path=runs/my-toy/final"),
    "config": ((), "hspace config evaluate.scale=2 > my.yaml  # then: hspace run --config my.yaml"),
}


def run(cfg):
    from pipeline.stages.run import run_all

    return run_all(cfg)


def print_config(cfg) -> None:
    """Print the resolved configuration, once every check that needs no data has passed (``main``)."""
    from pipeline.config import to_yaml

    print(to_yaml(cfg), end="")


def config_source(path, overrides) -> str:
    """One YAML comment line: which configuration file was read (or none), and how many overrides."""
    read = (f"read {path} ({Path(path).resolve()})" if path is not None
            else "no configuration file (./conf.yaml absent): the built-in defaults")
    return f"# hspace config: {read}" + (f", then {len(overrides)} override(s): {' '.join(overrides)}" if overrides else "")


def _default(field) -> str:
    import yaml

    value = field.get_default(call_default_factory=True)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def section_keys(section: str) -> list[str]:
    """``key = default`` lines (and each key's description) of a configuration section or key, read from
    the schema (``HSpaceConfig.model_fields``)."""
    import textwrap

    from pydantic import BaseModel

    from pipeline.config import HSpaceConfig

    model, fields, prefix = HSpaceConfig, None, ""
    for part in section.split("."):
        info = model.model_fields[part]
        prefix = f"{prefix}{part}."
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            model = info.annotation
        else:  # a single key
            fields = {part: info}
            prefix = prefix[: -len(part) - 1]
    lines = []
    for name, info in (fields or model.model_fields).items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            lines += section_keys(f"{prefix}{name}")
            continue
        lines.append(f"  {prefix}{name} = {_default(info)}")
        if info.description:
            lines += textwrap.wrap(info.description, 96, initial_indent="      ", subsequent_indent="      ")
    return lines


def stage_usage(name: str) -> str:
    """The keys a command reads, with their defaults, and an example."""
    sections, example = USAGE.get(name, ((), ""))
    lines = []
    for section in sections:
        lines += section_keys(section)
    text = ("configuration keys (set any as key=value; conf.yaml or --config sets them too):\n" + "\n".join(lines)
            + "\n" if lines else "")
    shared = "" if name in ("config", "train-toy", "finetune-toy", "train-toy-annotator") else \
        "also read: run_dir, model.*, trainer.* (hspace config --defaults lists every key)\n"
    return text + shared + (f"\nexample:\n  {example}\n" if example else "")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line and exit status 2, as every other problem the user can fix."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A sub-command's parser whose --help ends with the command's keys, defaults and example (the
    configuration schema is imported only when help is asked for)."""

    command: str = ""

    def format_help(self) -> str:
        return super().format_help() + "\n" + stage_usage(self.command)


def commands() -> dict:
    """name -> (function taking the config, help): `run`, every registered stage and tool, `config`."""
    return {"run": (run, "the main job: every stage in order"),
            **{name: (st.run, st.help) for name, st in COMMANDS.items()},
            "config": (print_config, "print the resolved configuration")}


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
    sub = p.add_subparsers(dest="stage", metavar="<stage>", required=True, parser_class=_CommandParser)
    for name, (_, help_) in commands().items():
        s = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
        s.command = name
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
    from annotators.base import check_columns
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
        record_command(sys.argv[1:] if argv is None else argv, path)
        cfg = load_config(path, args.overrides)
        check_columns(cfg, args.stage)  # the attributes asked for against the annotators' columns: before any work
        if args.stage == "run":
            from pipeline.stages.run import check_plan

            check_plan(cfg)  # run.skip, and what the stages need: before the run directory's lock is taken
        elif args.stage in STAGE_NAMES:
            COMMANDS[args.stage].check_reads(cfg)  # what it reads is there: before the lock (which creates the folder)
        if args.stage in DISTRIBUTED:
            from pipeline.stages.lightning_utils import check_trainer, join_launched_ranks

            check_trainer(cfg.trainer)  # settings that cannot work: refused before anything is written
            join_launched_ranks(cfg.trainer)
        command = commands()[args.stage][0]
        if args.stage == "config":
            print(config_source(path, args.overrides))
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
        if rank0:  # the stages of the main job resume where they stopped; the other commands start over
            resumes = args.stage == "run" or args.stage in STAGE_NAMES
            print(f"hspace {args.stage}: interrupted" + ("; re-run the same command to resume" if resumes else ""),
                  file=sys.stderr)
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
