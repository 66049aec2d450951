"""The dependency direction of DESIGN.md, checked by import-linter's contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the `processor` package under `root` with the project's contracts."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; "
            "sys.exit(lint_imports_command())",
            "--no-cache",
            str(ROOT / "pyproject.toml"),
        ],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_contract_is_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_verdict_that_reads_the_clock_breaks_a_contract(tmp_path: Path) -> None:
    # The contracts are not vacuous: the same check on a copy with one planted import fails.
    shutil.copytree(ROOT / "processor", tmp_path / "processor")
    planted = tmp_path / "processor" / "engine" / "fx.py"
    planted.write_text("import time  # planted\n" + planted.read_text())
    server = tmp_path / "processor" / "server" / "link.py"
    server.write_text("import processor.api.http  # planted\n" + server.read_text())
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "processor.engine.fx -> time" in result.stdout
    assert "processor.server is not allowed to import processor.api" in result.stdout
