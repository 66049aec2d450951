"""Approval-code numbers: the OS CSPRNG read in bulk, uniform below the bound."""

from __future__ import annotations

import struct
from collections import Counter

import pytest

from processor import randomness
from processor.randomness import BufferedRandom


def test_numbers_past_the_last_multiple_of_the_bound_are_drawn_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 20 bits per number, popped from the end: the last three words come out first.
    words = [0] * 1021 + [123_456, 1_000_000, (1 << 20) - 1]
    monkeypatch.setattr(randomness.os, "urandom", lambda size: struct.pack("<1024I", *words))
    assert BufferedRandom().below(1_000_000) == 123_456  # 2**20 - 1 and 10**6 discarded
    # Bound 3: the limit is 2**20 // 3 * 3 = 1,048,575, so 2**20 - 1 is drawn again and
    # 1,000,000 gives 1,000,000 % 3 = 1.
    assert BufferedRandom().below(3) == 1


def test_only_twenty_bits_of_each_word_count(monkeypatch: pytest.MonkeyPatch) -> None:
    words = [0] * 1023 + [(7 << 20) | 42]
    monkeypatch.setattr(randomness.os, "urandom", lambda size: struct.pack("<1024I", *words))
    assert BufferedRandom().below(1_000_000) == 42


def test_draws_cover_the_range_evenly() -> None:
    source = BufferedRandom()
    counts = Counter(source.below(10) for _ in range(50_000))
    assert set(counts) == set(range(10))
    assert all(4_500 < count < 5_500 for count in counts.values()), counts  # 5,000 +- 10 %
    assert all(0 <= source.below(1_000_000) < 1_000_000 for _ in range(5_000))


def test_two_sources_do_not_draw_the_same_sequence() -> None:
    assert [BufferedRandom().below(1_000_000) for _ in range(3)] != [
        BufferedRandom().below(1_000_000) for _ in range(3)
    ]
