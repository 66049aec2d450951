"""Hypothesis draws the same examples on every run unless asked to explore.

A property test that fails on one run in six catches nothing reliably and fails CI at random:
by default each test's examples are derived from the test itself (derandomize), and nothing is
read from or written to an example database, so a run here and a run in CI are the same run.
`PROCESSOR_HYPOTHESIS_EXPLORE=1 pytest tests/property` draws new examples (and keeps
failures in .hypothesis/ for replay), for a search by hand; what it finds becomes an
@example or a fixed test.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(
    "explore" if os.environ.get("PROCESSOR_HYPOTHESIS_EXPLORE") == "1" else "repeatable"
)
