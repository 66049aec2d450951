"""security.typed_card_numbers against the plain definition: every window of 13-19 digits in
a row, separators skipped, that passes the Luhn check."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from processor.security import luhn_valid, typed_card_numbers

SEPARATORS = " ._:/-"


def plainly(text: str) -> list[str]:
    found = []
    run = ""
    for char in [*text, "x"]:  # "x" ends the last run
        if char in "0123456789":  # a card number is written in ASCII digits
            run += char
            continue
        if char in SEPARATORS and run and not run.endswith(" ") and text:
            run += " "  # a single separator between digits keeps the run going
            continue
        digits = run.replace(" ", "")
        found += [
            digits[start:end]
            for start in range(len(digits))
            for end in range(start + 13, min(len(digits), start + 19) + 1)
            if luhn_valid(digits[start:end])
        ]
        run = ""
    return found


@given(st.text(alphabet="0123456789 ._:/-ab\u0664\u0967", max_size=80))
def test_every_luhn_window_of_a_typed_run_is_found(text: str) -> None:
    assert typed_card_numbers(text) == plainly(text)
