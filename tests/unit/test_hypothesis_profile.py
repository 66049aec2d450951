"""The property tests draw the same examples on every run (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def draws() -> list[bytes]:
    seen: list[bytes] = []

    @given(st.binary(min_size=1, max_size=64))
    @settings(max_examples=30)
    def record(data: bytes) -> None:
        seen.append(data)

    record()
    return seen


@pytest.mark.skipif(
    os.environ.get("PROCESSOR_HYPOTHESIS_EXPLORE") == "1", reason="exploring on purpose"
)
def test_two_runs_draw_the_same_examples() -> None:
    assert settings.default.derandomize
    assert settings.default.database is None
    first, second = draws(), draws()
    assert len(first) >= 10
    assert first == second
