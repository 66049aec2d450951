"""Engine layer: the authorisation decision as a pure function. No I/O, no clock, no logging."""

from processor.engine.decide import Decision, ProgrammeRules, Spend, decide, yymm

__all__ = ["Decision", "ProgrammeRules", "Spend", "decide", "yymm"]
