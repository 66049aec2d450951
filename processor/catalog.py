"""The controls catalog: MCC categories and country groups from specs/, checked at start.

Categories must be disjoint (usage is counted per category; see specs/mcc_categories.toml), and
every code well formed; a file that breaks either stops the daemon with the group named.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TypeVar

import msgspec

from processor.config import ConfigError
from processor.ledger.controls import Catalog
from processor.resources import spec_path

T = TypeVar("T")


class CategoryEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    description: str
    mccs: tuple[str, ...] = ()
    ranges: tuple[str, ...] = ()


class CountryGroup(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    description: str
    countries: tuple[str, ...]


def _decode_table(path: Path, table: str, entry_type: type[T]) -> dict[str, T]:
    """`[table.<name>]` entries of a TOML file, each decoded on its own so errors name it."""
    try:
        document = msgspec.toml.decode(path.read_bytes(), type=dict[str, dict[str, object]])
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except msgspec.DecodeError as error:
        raise ConfigError(f"{path}: {error}") from None
    unknown = set(document) - {table}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected [{table}]")
    entries: dict[str, T] = {}
    for name, raw in document.get(table, {}).items():
        try:
            entries[name] = msgspec.convert(raw, entry_type)
        except msgspec.ValidationError as error:
            raise ConfigError(f"{path}: $.{table}.{name}: {error}") from None
    return entries


def _mccs(name: str, entry: CategoryEntry, source: str) -> list[str]:
    codes = list(entry.mccs)
    for index, text in enumerate(entry.ranges):
        low, _, high = text.partition("-")
        if not (len(low) == len(high) == 4 and low.isdigit() and high.isdigit() and low <= high):
            raise ConfigError(
                f"{source}: $.categories.{name}.ranges[{index}]: {text!r} is not NNNN-NNNN"
            )
        codes.extend(f"{code:04d}" for code in range(int(low), int(high) + 1))
    for index, code in enumerate(entry.mccs):
        if not (len(code) == 4 and code.isdigit()):
            raise ConfigError(
                f"{source}: $.categories.{name}.mccs[{index}]: {code!r} is not 4 digits"
            )
    return codes


def load_catalog(
    categories_path: str | Path | None = None, groups_path: str | Path | None = None
) -> Catalog:
    categories_path = Path(categories_path or spec_path("mcc_categories.toml"))
    groups_path = Path(groups_path or spec_path("country_groups.toml"))
    categories = _decode_table(categories_path, "categories", CategoryEntry)
    groups = _decode_table(groups_path, "groups", CountryGroup)
    owner: dict[str, str] = {}
    for name, entry in categories.items():
        if not name.replace("_", "").isalnum() or not name.islower():
            raise ConfigError(f"{categories_path}: category name {name!r} must be lower case")
        for code in _mccs(name, entry, str(categories_path)):
            if code in owner:
                raise ConfigError(
                    f"{categories_path}: MCC {code} is in both {owner[code]!r} and {name!r}; "
                    "categories must be disjoint"
                )
            owner[code] = name
    country_groups: dict[str, frozenset[str]] = {}
    for name, group in groups.items():
        for index, country in enumerate(group.countries):
            if not (
                len(country) == 2 and country.isascii() and country.isalpha() and country.isupper()
            ):
                raise ConfigError(f"{groups_path}: $.groups.{name}.countries[{index}]: {country!r}")
        country_groups[name] = frozenset(group.countries)
    return Catalog(owner, frozenset(categories), country_groups)


@cache
def default_catalog() -> Catalog:
    return load_catalog()
