"""JSON Schema documents generated from Structs, stable across msgspec releases, in JSON Schema's
regex dialect.

msgspec renders a Struct's docstring into the schema's `description`; releases have differed in
whether they dedent it (0.23 strips the docstring indentation, earlier ones kept it). The shipped
documents in specs/ are compared to what this generates, so prose is normalised here with the
same rule as `inspect.cleandoc`: a library's whitespace change must not read as a contract change.
"""

from __future__ import annotations

import inspect
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


def readable(error: Exception) -> str:
    """A validation error's text with its pattern as people (and JSON Schema) write it: msgspec
    quotes the pattern's repr, where the code's `\\Z` shows as a doubled backslash."""
    return str(error).replace("\\\\Z", "$")
