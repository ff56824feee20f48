"""Every benchmark script runs its own smoke command end to end (their numbers are not checked here: speed claims
live in benchmarks/, never in timed tests).

Each ``benchmarks/*.py`` names exactly one line of its module docstring as its smoke command, marked ``# smoke`` at
the end; the test runs that very command (in-process, through the script's ``main(argv)``) with ``--out`` pointed at
a temporary directory, so the documented command cannot rot. A new script without a smoke line fails here."""

import argparse
import ast
import importlib.util
import json
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
REPO = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
TRACKED = ("benchmarks/results", "fxcache/assets")  # the defaults must never write here
MARKER = "# smoke"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def smoke_argv(name: str) -> list[str]:
    """The arguments of the docstring line of ``benchmarks/<name>.py`` that ends with ``# smoke``."""
    doc = ast.get_docstring(ast.parse((BENCHMARKS / f"{name}.py").read_text())) or ""
    lines = [line for line in doc.splitlines() if line.rstrip().endswith(MARKER)]
    assert len(lines) == 1, f"benchmarks/{name}.py: its docstring needs exactly one line ending with {MARKER!r}"
    command = shlex.split(lines[0][: lines[0].rindex(MARKER)])
    assert command[:2] == ["python", f"benchmarks/{name}.py"], f"not a command of this script: {lines[0]!r}"
    return command[2:]


def _values(argv: list[str], option: str, default: list[str]) -> list[str]:
    """The values given to ``option`` in ``argv`` (up to the next option), else ``default``."""
    if option not in argv:
        return default
    rest = argv[argv.index(option) + 1:]
    return rest[: next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]


def _git_status() -> str | None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *TRACKED], cwd=REPO,
                          check=False, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


# ---------------------------------------------------------------------------------------------------------------
# what each script's smoke run must have written (beyond: it exited 0 and wrote into --out)


def _check_speed(out: pathlib.Path, argv: list[str]) -> None:
    (path,) = out.glob("speed_*.json")
    result = json.loads(path.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    backend = "inductor" if result["device"] == "cuda" else "aot_eager"
    assert {"uncached eager", f"uncached torch.compile ({backend})"} <= set(rows)
    cached = [r for name, r in rows.items() if name.startswith("fxcache")]
    assert len(cached) >= 4  # per --full count: reuse and taylor1, each eager and compiled
    assert all(r["computed_fraction"] < 1 and r["ideal_s"] > 0 for r in cached)
    assert path.with_suffix(".md").read_text().count("| fxcache") == len(cached)
    for peer in _values(argv, "--peers", ["diffusers", "cache-dit"]):  # the smoke model is one both support
        peer_rows = [r for name, r in rows.items() if name.startswith(peer)]
        assert peer_rows and not [r for r in peer_rows if "error" in r], peer_rows


def _check_quality(out: pathlib.Path, argv: list[str]) -> None:
    (path,) = out.glob("quality_*.json")
    result = json.loads(path.read_text())
    families = {r["family"] for r in result["rows"] if "error" not in r}
    assert {"fxcache auto", "diffusers FirstBlockCache", "cache-dit DBCache"} <= families
    assert {f"fxcache {m}" for m in _values(argv, "--methods", [])} <= families
    auto = next(r for r in result["rows"] if r["family"] == "fxcache auto")
    assert abs(auto["fraction"] - auto["fxcache_computed_fraction"]) < 1e-6  # fxcache's own count = FLOP counter
    # the symmetric protocol chooses on the trajectories fxcache's search may race on: every prompt on DRAWS seeds
    from fxcache.search import DRAWS

    assert len(set(result["calibration_seeds"])) == DRAWS * len(result["calibration_prompts"])
    assert path.with_suffix(".md").read_text().startswith("Held-out PSNR")
    assert path.with_suffix(".png").stat().st_size > 10_000


def _check_train_digits(out: pathlib.Path, argv: list[str]) -> None:
    from safetensors.torch import load_file

    (path,) = out.glob("digits_*.safetensors")
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["steps"] == int(argv[argv.index("--steps") + 1]) and "--steps" in card["command"]
    bundled = load_file(str(REPO / "fxcache" / "assets" / path.name))
    trained = load_file(str(path))
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in bundled.items()}  # a drop-in
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())


def _check_gpu_check(out: pathlib.Path, argv: list[str]) -> None:
    """`--tiny`: every section runs and writes its rows (the GPU tests are skipped on a CPU, and say so)."""
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["versions"]["torch"]
    rows = {(r["section"], r["row"]): r for r in result["rows"]}
    assert rows[("tests", "pytest -m gpu")]["returncode"] == 0
    if result["device"] == "cpu":
        assert "skipped" in rows[("tests", "pytest -m gpu")]["summary"]
    for model in ("tiny-dit", "tiny-flux"):
        assert rows[(model, "(section)")]["returncode"] == 0
        assert rows[(model, "uncached eager")]["wall_s"] > 0
        fx = next(r for (m, name), r in rows.items() if m == model and name.startswith("fxcache") and "wall_s" in r
                  and "ratio_to_ideal" not in r)
        assert fx["computed_fraction"] < 1 and fx["build_s"] > 0 and fx["optimize_s"] >= fx["build_s"]
        assert any(m == model and name.startswith("cache-dit") for m, name in rows)


CHECKS = {"speed": _check_speed, "quality": _check_quality, "train_digits": _check_train_digits,
          "gpu_check": _check_gpu_check}
NEEDS = {"quality": ("cache_dit", "skimage", "matplotlib"), "speed": ("cache_dit",), "gpu_check": ("cache_dit",),
         "train_digits": ("sklearn", "safetensors")}


@pytest.fixture
def torch_state(monkeypatch):
    """The smoke runs measure nothing: one thread each, here and in the scripts' child processes. Two threads per
    process on a shared 2-core machine spin against each other (a digits sample took 6.6 s instead of 0.14 s).
    torch's global state is put back afterwards: a script's ``main`` may switch autograd off for the whole process
    (quality.py does), which would break the next script (training) and every later test."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_command_runs(name, tmp_path, monkeypatch, torch_state):
    argv = smoke_argv(name)
    for module in NEEDS.get(name, ()):
        pytest.importorskip(module)
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a relative default path would land here, and is caught below
    before = _git_status()
    assert _load(name).main([*argv, "--out", str(out)]) == 0
    assert out.is_dir() and any(out.iterdir()), f"{name} wrote nothing into --out"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"
    assert not any(cwd.iterdir()), f"{name} wrote into the current directory despite --out: {list(cwd.iterdir())}"
    assert _git_status() == before, f"{name} changed tracked results or assets"
    CHECKS.get(name, lambda out, argv: None)(out, argv)


# ---------------------------------------------------------------------------------------------------------------
# arguments


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's ``main`` builds (caught as it parses, so nothing runs)."""
    def grab(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parsed) as caught:
        _load(name).main([])
    return caught.value.parser


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_shows_its_default(name, monkeypatch):
    parser = _parser(name, monkeypatch)
    shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    missing = [action.option_strings[0] for action in parser._actions
               if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)
               and not action.required and action.nargs != 0  # a flag is off unless given
               and not (action.help and (shows_defaults or "default" in action.help))]
    assert not missing, f"benchmarks/{name}.py: options whose help does not show their default: {missing}"


def test_speed_drops_full_counts_above_the_steps(tmp_path, monkeypatch, caplog, capsys):
    """More full steps than steps cannot be scheduled: dropped with a warning, or an error when none is left."""
    speed = _load("speed")
    ran = []
    monkeypatch.setattr(speed, "run", lambda args: ran.append(args.full)
                        or {"rows": [], "backend": "x", "baseline": "uncached eager"})
    assert speed.main(["--steps", "8", "--full", "6", "10", "8", "--out", str(tmp_path)]) == 0
    assert ran == [[6, 8]] and "--full 10 dropped" in caplog.text
    with pytest.raises(SystemExit) as exit_:
        speed.main(["--steps", "4", "--full", "6", "10", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "exceeds --steps 4" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_quality_refuses_a_peer_sweep_outside_the_steps(value, tmp_path, capsys, torch_state):
    """``--peer-full`` is a fraction of the steps: outside (0, 1] the script exits 2 naming it, before any run."""
    with pytest.raises(SystemExit) as exit_:
        _load("quality").main(["--peer-full", value, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and f"--peer-full must be in (0, 1], got {float(value)}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
