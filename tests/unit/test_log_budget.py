"""A link's log budget: a burst of lines per kind, then one per interval counting the rest."""

from processor import limits
from processor.log_budget import LogBudget

BURST = limits.log_lines_per_kind_burst
INTERVAL = limits.log_suppressed_interval_seconds


def test_a_burst_then_one_line_per_interval_saying_how_many_were_left_out() -> None:
    budget = LogBudget()
    assert [budget.allow("undecodable", 0.0) for _ in range(BURST)] == [0] * BURST
    assert [budget.allow("undecodable", 1.0) for _ in range(3)] == [None] * 3
    assert budget.allow("undecodable", INTERVAL - 0.001) is None  # measured from the last line
    assert budget.allow("undecodable", INTERVAL + 0.5) == 4  # four left out since
    assert budget.allow("undecodable", INTERVAL + 1.0) is None
    assert budget.allow("undecodable", 2 * INTERVAL + 0.5) == 1


def test_kinds_have_budgets_of_their_own() -> None:
    budget = LogBudget()
    for _ in range(BURST):
        budget.allow("undecodable", 0.0)
    assert budget.allow("undecodable", 0.0) is None
    assert budget.allow("format_error", 0.0) == 0


def test_a_quiet_spell_after_the_burst_writes_the_next_line_with_nothing_left_out() -> None:
    budget = LogBudget()
    for _ in range(BURST):
        budget.allow("format_error", 0.0)
    assert budget.allow("format_error", INTERVAL) == 0
