"""Locate data files shipped in specs/ (in a source checkout) or processor/_specs (in a wheel)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def spec_path(name: str) -> Path:
    for candidate in (_PACKAGE / "_specs" / name, _PACKAGE.parent / "specs" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"data file {name!r} not found in processor/_specs or specs/")


def demo_data_path() -> Path:
    return _PACKAGE / "data" / "demo.toml"
