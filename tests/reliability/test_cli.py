"""The command line: one line naming the cause and exit status 2 for every error (a traceback only with
--debug), --version, every option's help with its default, and the extra a command needs when it is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import fxcache
from fxcache import cli


def _run(args, capsys):
    try:
        code = cli.main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"fxcache {fxcache.__version__}"


@pytest.mark.parametrize("args,cause", [
    (["demo", "--steps", "0"], "argument --steps: needs at least 2 sampling steps, got 0"),
    (["demo", "--speedup", "-1"], "argument --speedup: must be a number >= 1, got -1"),
    (["demo", "--speedup", "fast"], "argument --speedup: 'fast' is not a number"),
    (["demo", "--nope"], "unrecognized arguments: --nope"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, args, cause):
    code, _, err = _run(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and cause in lines[0] and "--help" in lines[0], err


def test_every_option_has_help_with_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no line wrapping inside the defaults
    parser = cli.build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    text = demo.format_help()
    for option, default in (("--speedup", "3.0"), ("--steps", "20"), ("--out", "fxcache-demo")):
        assert option in text and f"(default: {default})" in text, text
    assert "needs fxcache[diffusers,plot]" in text


def test_a_missing_extra_is_named(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    code, _, err = _run(["demo", "--quiet"], capsys)
    assert code == 2
    assert err.strip() == ("fxcache demo: error: fxcache demo needs the 'diffusers' package, which is not installed: "
                           "pip install 'fxcache[diffusers]' (run with --debug for the traceback)")


def test_a_failure_inside_a_command_is_one_line_unless_debug(capsys, monkeypatch, tmp_path):
    def boom(args):
        raise fxcache.InputError("something specific went wrong\nwith detail")

    monkeypatch.setattr(cli, "demo", boom)
    code, _, err = _run(["demo", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.strip() == ("fxcache demo: error: something specific went wrong with detail "
                                         "(run with --debug for the traceback)")
    with pytest.raises(fxcache.InputError):
        cli.main(["--debug", "demo", "--out", str(tmp_path)])


def test_the_installed_command_runs():
    proc = subprocess.run([sys.executable, "-m", "fxcache.cli", "--version"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("fxcache ")
