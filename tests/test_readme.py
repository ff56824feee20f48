"""README verbatim: every ```python block of README.md, concatenated in order, runs in a fresh interpreter."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"

pytest.importorskip("diffusers")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text())) >= 4


def test_the_method_table_lists_every_method_with_what_it_caches_its_rule_and_source():
    from fxcache.methods import LIBRARY

    text = README.read_text()
    table = text[text.index("| method | what it caches | rule | source |"):].split("\n\n")[0].splitlines()[2:]
    names = [re.match(r"\| `(\w+)\(", row).group(1) for row in table]
    assert sorted(names) == sorted(cls.__name__ for cls in LIBRARY)
    for row in table:
        cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
        assert len(cells) == 4 and all(cells), row


@pytest.mark.slow
def test_every_readme_snippet_runs_as_written(tmp_path):
    blocks = python_blocks(README.read_text())
    script = "\n\n".join(f"# --- README block {i + 1}\n{b}" for i, b in enumerate(blocks))
    (tmp_path / "readme_snippets.py").write_text(script)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "readme_snippets.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, f"README snippets failed:\n{proc.stderr[-4000:]}"
    for name in ("profile.png", "plan.json", "pipe_plan.json", "calib/profile.json", "engines/manifest.json"):
        assert (tmp_path / name).exists(), name
