"""The controls catalog: specs/mcc_categories.toml and specs/country_groups.toml, and their loader.

The shipped files are read here independently (tomllib, ranges expanded by hand) and compared
with what processor.catalog makes of them; broken files must be refused naming the key or MCC.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from processor.catalog import default_catalog, load_catalog
from processor.config import ConfigError
from processor.resources import spec_path

CATEGORIES_FILE = Path(spec_path("mcc_categories.toml"))
GROUPS_FILE = Path(spec_path("country_groups.toml"))
EXPECTED_CATEGORIES = {
    "gambling",
    "cash",
    "quasi_cash",
    "money_transfer",
    "securities",
    "airlines",
    "car_rental",
    "hotels",
    "transport",
    "fuel",
    "groceries",
    "restaurants",
    "digital_goods",
    "adult",
}
EU = {
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE",
    "IT", "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE",
}  # fmt: skip


def expanded(entry: dict[str, list[str]]) -> list[str]:
    """The MCCs of one category as the file means them: codes plus inclusive ranges."""
    codes = list(entry.get("mccs", []))
    for text in entry.get("ranges", []):
        low, high = text.split("-")
        codes += [f"{code:04d}" for code in range(int(low), int(high) + 1)]
    return codes


def shipped_categories() -> dict[str, list[str]]:
    data = tomllib.loads(CATEGORIES_FILE.read_text())
    return {name: expanded(entry) for name, entry in data["categories"].items()}


# --- the shipped files ---------------------------------------------------------------------------


def test_shipped_catalog_loads() -> None:
    catalog = load_catalog()
    assert catalog.categories == EXPECTED_CATEGORIES
    assert set(catalog.country_groups) == {"eu", "eea"}
    assert default_catalog() == catalog


def test_shipped_categories_are_disjoint() -> None:
    seen: dict[str, str] = {}
    for name, codes in shipped_categories().items():
        assert len(codes) == len(set(codes)), f"{name} lists an MCC twice"
        for code in codes:
            assert code not in seen, f"MCC {code} is in both {seen[code]} and {name}"
            seen[code] = name


def test_every_shipped_mcc_maps_to_its_one_category() -> None:
    categories = shipped_categories()
    catalog = load_catalog()
    expected = {code: name for name, codes in categories.items() for code in codes}
    assert dict(catalog.category_of_mcc) == expected
    for code in expected:
        assert len(code) == 4 and code.isdigit()


@pytest.mark.parametrize(
    ("mcc", "category"),
    [
        ("7995", "gambling"),
        ("9406", "gambling"),
        ("6011", "cash"),
        ("6010", "cash"),
        ("6051", "quasi_cash"),
        ("4829", "money_transfer"),
        # Ranges, inclusive at both ends.
        ("2999", None),
        ("3000", "airlines"),
        ("3150", "airlines"),
        ("3302", "airlines"),
        ("3303", None),
        ("4511", "airlines"),
        ("3350", None),
        ("3351", "car_rental"),
        ("3441", "car_rental"),
        ("3442", None),
        ("3500", None),
        ("3501", "hotels"),
        ("3999", "hotels"),
        ("4000", None),
        ("7011", "hotels"),
        ("5411", "groceries"),
        ("5812", "restaurants"),
        ("5933", None),  # pawn shops: in no category
        ("0000", None),
    ],
)
def test_category_of_an_mcc(mcc: str, category: str | None) -> None:
    assert default_catalog().category(mcc) == category


def test_shipped_country_groups() -> None:
    groups = default_catalog().country_groups
    assert groups["eu"] == frozenset(EU)
    assert groups["eea"] == frozenset(EU | {"IS", "LI", "NO"})
    for members in groups.values():
        assert all(len(c) == 2 and c.isascii() and c.isalpha() and c.isupper() for c in members)


def test_groups_are_named_in_lower_case_and_codes_are_not() -> None:
    # Controls tell a group from a country by case ("eea" vs "EE"): the two must never clash.
    catalog = default_catalog()
    assert all(name.islower() for name in catalog.country_groups)
    assert all(name.islower() for name in catalog.categories)


def test_catalog_names_countries_directly_and_through_groups() -> None:
    catalog = default_catalog()
    assert catalog.countries(["eu", "CH"]) == frozenset(EU | {"CH"})
    assert catalog.countries(["eea", "eu"]) == catalog.country_groups["eea"]
    assert catalog.countries([]) == frozenset()


# --- broken files --------------------------------------------------------------------------------

GOOD_GROUPS = '[groups.eu]\ndescription = "x"\ncountries = ["DE", "FR"]\n'
GOOD_CATEGORIES = '[categories.cash]\ndescription = "x"\nmccs = ["6010", "6011"]\n'


def write(tmp_path: Path, categories: str, groups: str = GOOD_GROUPS) -> tuple[Path, Path]:
    categories_path = tmp_path / "categories.toml"
    groups_path = tmp_path / "groups.toml"
    categories_path.write_text(categories)
    groups_path.write_text(groups)
    return categories_path, groups_path


def test_a_small_valid_catalog(tmp_path: Path) -> None:
    text = GOOD_CATEGORIES + '[categories.air]\ndescription = "x"\nranges = ["3000-3002"]\n'
    catalog = load_catalog(*write(tmp_path, text))
    assert dict(catalog.category_of_mcc) == {
        "6010": "cash",
        "6011": "cash",
        "3000": "air",
        "3001": "air",
        "3002": "air",
    }
    assert catalog.categories == {"cash", "air"}
    assert catalog.country_groups == {"eu": frozenset({"DE", "FR"})}


@pytest.mark.parametrize(
    ("categories", "named"),
    [
        pytest.param(
            GOOD_CATEGORIES + '[categories.atm]\ndescription = "x"\nmccs = ["6011"]\n',
            ["MCC 6011", "'cash'", "'atm'", "disjoint"],
            id="same-mcc-in-two-categories",
        ),
        pytest.param(
            '[categories.a]\ndescription = "x"\nranges = ["3000-3010"]\n'
            '[categories.b]\ndescription = "x"\nranges = ["3010-3020"]\n',
            ["MCC 3010", "'a'", "'b'"],
            id="overlapping-ranges",
        ),
        pytest.param(
            '[categories.a]\ndescription = "x"\nranges = ["3000-3010"]\n'
            '[categories.b]\ndescription = "x"\nmccs = ["3005"]\n',
            ["MCC 3005", "'a'", "'b'"],
            id="mcc-inside-another-categorys-range",
        ),
        pytest.param(
            '[categories.a]\ndescription = "x"\nmccs = ["6011", "6011"]\n',
            ["MCC 6011", "'a'"],
            id="mcc-twice-in-one-category",
        ),
        pytest.param(
            '[categories.a]\ndescription = "x"\nmccs = ["6011", "601"]\n',
            ["$.categories.a.mccs[1]", "'601'"],
            id="mcc-not-four-digits",
        ),
        pytest.param(
            '[categories.a]\ndescription = "x"\nmccs = ["60x1"]\n',
            ["$.categories.a.mccs[0]", "'60x1'"],
            id="mcc-not-digits",
        ),
        pytest.param(
            '[categories.a]\ndescription = "x"\nranges = ["3000-3010", "3020-302"]\n',
            ["$.categories.a.ranges[1]", "'3020-302'"],
            id="range-end-short",
        ),
        pytest.param(
            '[categories.a]\ndescription = "x"\nranges = ["3010-3000"]\n',
            ["$.categories.a.ranges[0]", "'3010-3000'"],
            id="range-backwards",
        ),
        pytest.param(
            '[categories.a]\ndescription = "x"\nranges = ["3000"]\n',
            ["$.categories.a.ranges[0]", "'3000'"],
            id="range-without-end",
        ),
        pytest.param(
            '[categories.Gambling]\ndescription = "x"\nmccs = ["7995"]\n',
            ["'Gambling'", "lower case"],
            id="category-name-upper-case",
        ),
        pytest.param(
            '[categories.a]\ndescription = "x"\ncodes = ["7995"]\n',
            ["unknown field `codes`", "$.categories"],
            id="unknown-key",
        ),
        pytest.param(
            '[categories.a]\nmccs = ["7995"]\n',
            ["missing required field `description`", "$.categories.a"],
            id="missing-description",
        ),
        pytest.param('[categories.a\ndescription = "x"\n', ["categories.toml"], id="not-toml"),
    ],
)
def test_broken_categories_are_refused_naming_what(
    tmp_path: Path, categories: str, named: list[str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_catalog(*write(tmp_path, categories))
    message = str(raised.value)
    for part in named:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("groups", "named"),
    [
        pytest.param(
            '[groups.eu]\ndescription = "x"\ncountries = ["DE", "de"]\n',
            ["$.groups.eu.countries[1]", "'de'"],
            id="lower-case-country",
        ),
        pytest.param(
            '[groups.eu]\ndescription = "x"\ncountries = ["DEU"]\n',
            ["$.groups.eu.countries[0]", "'DEU'"],
            id="alpha-3-country",
        ),
        pytest.param(
            '[groups.eu]\ndescription = "x"\ncountries = ["D1"]\n',
            ["$.groups.eu.countries[0]", "'D1'"],
            id="digit-in-country",
        ),
        pytest.param(
            '[groups.eu]\ndescription = "x"\n',
            ["missing required field `countries`", "$.groups"],
            id="missing-countries",
        ),
    ],
)
def test_broken_country_groups_are_refused_naming_what(
    tmp_path: Path, groups: str, named: list[str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_catalog(*write(tmp_path, GOOD_CATEGORIES, groups))
    message = str(raised.value)
    for part in named:
        assert part in message, (part, message)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.toml: cannot read"):
        load_catalog(tmp_path / "nowhere.toml", GROUPS_FILE)
