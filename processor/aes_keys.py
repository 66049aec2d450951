"""AES-256 keys from the environment: the one rule for every key list the processor reads
(personal data, the PAN vault). Each variable holds 64 hex digits; the first key listed is the
one that encrypts, the others only decrypt (rotation). An error names the setting and the
variable, never a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from processor.development_keys import is_published

KEY_BYTES: Final = 32


def aes_keys_from_environment(
    variables: tuple[str, ...],
    environ: Mapping[str, str],
    *,
    setting: str,
    purpose: str,
    published: bytes,
    demo: bool,
) -> list[bytes] | None:
    """The keys, or None under `demo` when no variable is set (the caller then uses the
    `published` development key). Raises ValueError naming `setting[i] (VARIABLE)`."""
    if demo and not any(environ.get(variable) for variable in variables):
        return None
    keys: list[bytes] = []
    for position, variable in enumerate(variables):
        value = environ.get(variable, "")
        where = f"{setting}[{position}] ({variable})"
        if not value:
            raise ValueError(
                f"{where} is not set: {purpose} (AES-256: {KEY_BYTES * 2} hex digits, e.g. "
                f"openssl rand -hex {KEY_BYTES})"
            )
        try:
            key = bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{where} is not hexadecimal") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"{where} holds {len(key)} bytes; AES-256 needs {KEY_BYTES}")
        if key == published or is_published(key):
            raise ValueError(f"{where} holds a published development key")
        keys.append(key)
    return keys
