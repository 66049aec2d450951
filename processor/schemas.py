"""JSON Schema documents generated from Structs, stable across msgspec releases, in JSON Schema's
regex dialect.

msgspec renders a Struct's docstring into the schema's `description`; releases have differed in
whether they dedent it (0.23 strips the docstring indentation, earlier ones kept it). The shipped
documents in specs/ are compared to what this generates, so prose is normalised here with the
same rule as `inspect.cleandoc`: a library's whitespace change must not read as a contract change.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any


def normalise_schema(node: Any) -> Any:
    """The same schema with every `description` string dedented and stripped, and every
    `pattern` in JSON Schema's dialect (ECMA-262): the code ends its patterns with Python's
    `\\Z` (processor/types.py says why), which there is `$` (and `\\Z` a literal Z)."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else value.replace("\\Z", "$")
            if key == "pattern" and isinstance(value, str)
            else normalise_schema(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [normalise_schema(item) for item in node]
    return node


# A bound msgspec states ("Expected `int` <= 1000000000000000"): the schema's, never the value
# sent. Written with its thousands grouped, because a run of 13 digits or more reads as a card
# number to the masking every error passes through (10^15 is Luhn-valid): the message then
# hid the very limit it was about.
_LONG_BOUND = re.compile(r"(?<=[<>]= )(-?[0-9]{13,})\b")


def readable(error: Exception) -> str:
    """A validation error's text with its pattern as people (and JSON Schema) write it: msgspec
    quotes the pattern's repr, where the code's `\\Z` shows as a doubled backslash; and with
    its long bounds grouped (1_000_000_000_000_000), so no masking takes them for a PAN."""
    text = str(error).replace("\\\\Z", "$")
    return _LONG_BOUND.sub(lambda found: f"{int(found[1]):_}", text)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as the parser met it: its keys in order, repeats kept."""


def repeated_key(document: bytes) -> str | None:
    """The path ($.amount, $.controls.amount_limits[0].amount) of the first key given twice
    in one object of a JSON document msgspec has read, or None. msgspec keeps the last of a
    repeated key without a word; money and card fields must not depend on which of two
    readings a reader takes. The documents are small (an API body, a clearing line); the
    standard parser keeps every pair for this. RecursionError (nested too deeply for it) is
    the caller's to refuse: a repeat could hide beside the depth."""
    try:
        parsed = json.loads(document, object_pairs_hook=_Pairs)
    except ValueError:
        return None  # what msgspec read and this parser cannot (a number of 5,000 digits)
    stack: list[tuple[str, Any]] = [("$", parsed)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, _Pairs):
            seen: set[str] = set()
            for key, item in value:
                if key in seen:
                    return f"{path}.{key}"
                seen.add(key)
                stack.append((f"{path}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
    return None
