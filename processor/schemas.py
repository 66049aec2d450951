"""JSON Schema documents generated from Structs, stable across msgspec releases.

msgspec renders a Struct's docstring into the schema's `description`; releases have differed in
whether they dedent it (0.23 strips the docstring indentation, earlier ones kept it). The shipped
documents in specs/ are compared to what this generates, so prose is normalised here with the
same rule as `inspect.cleandoc`: a library's whitespace change must not read as a contract change.
"""

from __future__ import annotations

import inspect
from typing import Any


def normalise_descriptions(node: Any) -> Any:
    """The same schema with every `description` string dedented and stripped."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else normalise_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [normalise_descriptions(item) for item in node]
    return node
