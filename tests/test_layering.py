"""The layering contract (pyproject.toml, docs/design.md §6): each stage imports only earlier ones.

import-linter checks the installed package; a copy of the package with one upward import added
(a pruner importing the Ray Train stage) must break the contract."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_package_keeps_its_layers():
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copytree(REPO / "tprl_ray", tmp_path / "tprl_ray", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    base = tmp_path / "tprl_ray" / "pruners" / "base.py"
    base.write_text(base.read_text() + "\nfrom tprl_ray.training.common import fit  # noqa: E402,F401\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0 and "tprl_ray.pruners.base -> tprl_ray.training.common" in proc.stdout, proc.stdout
