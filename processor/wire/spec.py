"""Load an ISO 8583 spec from its TOML data file into the dict pyiso8583 works from."""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

import msgspec

from processor.resources import spec_path
from processor.types import Bitmap

_LENGTH_TYPES = {"fixed": 0, "LLVAR": 2, "LLLVAR": 3}


class FieldSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    desc: str
    length: Literal["fixed", "LLVAR", "LLLVAR"]
    max: int
    content: str


class SpecFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    bitmap: Bitmap
    fields: dict[str, FieldSpec]


class Spec(msgspec.Struct, frozen=True):
    name: str
    iso: dict[str, dict[str, Any]]  # what iso8583.decode/encode take
    numeric_fields: frozenset[str]  # content "n": validated as ASCII digits


@cache
def load_spec(bitmap: Bitmap = "ascii", file_name: str = "iso8583_1987_ascii.toml") -> Spec:
    """The ASCII spec, with hex-ASCII bitmaps or (bitmap="binary") 8-byte binary bitmaps."""
    data = msgspec.toml.decode(spec_path(file_name).read_bytes(), type=SpecFile)
    iso: dict[str, dict[str, Any]] = {
        "h": {
            "data_enc": "ascii",
            "len_enc": "ascii",
            "len_type": 0,
            "max_len": 0,
            "desc": "Header",
        }
    }
    for key, field in data.fields.items():
        iso[key] = {
            "data_enc": "ascii",
            "len_enc": "ascii",
            "len_type": _LENGTH_TYPES[field.length],
            "max_len": field.max,
            "desc": field.desc,
        }
    if bitmap == "binary":
        for key in ("p", "1"):
            iso[key] = dict(iso[key], data_enc="b", max_len=8)
    missing = {"t", "p", "1", *map(str, range(2, 129))} - iso.keys()
    if missing:
        raise ValueError(f"spec {file_name}: missing fields {sorted(missing, key=_order)}")
    numeric = frozenset(k for k, f in data.fields.items() if f.content == "n" and k != "t")
    return Spec(name=f"{data.name}/{bitmap}-bitmap", iso=iso, numeric_fields=numeric)


def _order(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (0, key)
