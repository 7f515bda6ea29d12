"""`check_columns` runs once, where the CLI loads the configuration: every command whose columns come from
the configured annotators or scorer refuses an attribute they do not give before any work, without each
stage having to remember it; a lone `hspace select` takes the columns of the run's annotations file."""
from __future__ import annotations

import signal

import pytest

from conftest import TESTS
from pipeline.cli import main


@pytest.mark.parametrize("command,key,what", [("annotate", "select.attributes", "annotate.annotators ['toy']"),
                                              ("run", "select.attributes", "annotate.annotators ['toy']"),
                                              ("config", "select.attributes", "annotate.annotators ['toy']"),
                                              ("evaluate", "evaluate.attributes", "the scorer toy"),
                                              ("run", "evaluate.attributes", "the scorer toy")])
def test_every_command_refuses_an_attribute_no_annotator_gives_before_any_work(command, key, what, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.chdir(TESTS.parent / "docs")  # no conf.yaml here: only the defaults and the arguments
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run = tmp_path / "run"
    try:
        rc = main([command, f"run_dir={run}", f"{key}=[smile, grin]"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"hspace {command}: error: {key}=['smile', 'grin'] in the command line: ['grin'] "
                          f"not among the columns of {what}")
    assert not run.exists()  # nothing written, not even the run directory
