from pathlib import Path

import pytest

from processor.config import Config, ConfigError, load_config, parse_config, with_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_equals_embedded_defaults() -> None:
    assert load_config(ROOT / "config" / "processor.toml") == Config()


def test_no_file_means_defaults() -> None:
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[server]\nprot = 1\n", "$.server"),
        ("[server]\nworkers = 0\n", "$.server.workers"),
        ("[[listeners]]\nname = 'a'\nport = 'x'\n", "$.listeners[0].port"),
        ("[[listeners]]\nname = 'a'\nport = 70000\n", "$.listeners[0].port"),
        ("[[listeners]]\nname = 'a'\nframing = 'len3'\n", "$.listeners[0].framing"),
        ("[[listeners]]\nport = 1\n", "$.listeners[0]"),  # no name
        ("[[listeners]]\nname = 'A B'\n", "$.listeners[0].name"),
        (
            "[[listeners]]\nname = 'a'\nframing = 'ascii4'\nmax_frame_bytes = 20000\n",
            "$.listeners[0]",
        ),
        ("listeners = []\n", "at least one [[listeners]]"),
        ("[[listeners]]\nname = 'a'\n[[listeners]]\nname = 'a'\nport = 1\n", "'a' is used twice"),
        ("[[listeners]]\nname = 'a'\n[[listeners]]\nname = 'b'\n", "127.0.0.1:8583 is used twice"),
        ("[webhooks]\nbackoff_max_seconds = inf\n", "$.webhooks.backoff_max_seconds"),
        (
            "[webhooks]\nbackoff_initial_seconds = 60\nbackoff_max_seconds = 30\n",
            "backoff_initial_seconds 60.0 is above backoff_max_seconds 30.0",
        ),
        (
            "[[webhooks.endpoints]]\nname = 'h'\nurl = 'http://127.0.0.1:1/'\n"
            "secret_envs = ['S']\n"
            "[[webhooks.endpoints]]\nname = 'h'\nurl = 'http://127.0.0.1:2/'\n"
            "secret_envs = ['S']\n",
            "endpoints[1].name: 'h' is used twice",
        ),
        ("[ledger]\ndurability = 'maybe'\n", "$.ledger.durability"),
        ("[ledger]\nmap_size_max_bytes = 1024\n", "$.ledger.map_size_max_bytes"),
        ("[ledger]\ncheckpoint_seconds = 0\n", "$.ledger.checkpoint_seconds"),
        ("[ledger]\nwrite_ahead_log_bytes = -1\n", "$.ledger.write_ahead_log_bytes"),
        (
            "[ledger]\nwrite_ahead_log_bytes = 4096\n",
            "write_ahead_log_bytes 4096 is below 65536: too small for a batch",
        ),
        (
            "[ledger]\nmap_size_bytes = 4194304\nmap_size_max_bytes = 2097152\n",
            "map_size_max_bytes 2097152 is below map_size_bytes 4194304",
        ),
        ("[programme]\ntime_zone = 'Mars/Olympus'\n", "$.programme"),
        (
            "[retention]\nevents_seconds = 7200\nanswers_seconds = 3600\n",
            "events_seconds 7200 is above answers_seconds 3600",
        ),
        (
            "[retention]\nanswers_seconds = 86400\nevents_seconds = 3600\n",
            "answers_seconds 86400 is below the longest hold lifetime (2592000 s",
        ),
        ("[retention]\nidempotency_seconds = 60\n", "$.retention.idempotency_seconds"),
        ("[retention]\nkeep = true\n", "keep"),
        (
            "[programme.card_issuing]\nbin_prefix = '47617x'\n",
            "$.programme.card_issuing.bin_prefix",
        ),
        # The pattern as people write it: the code's \Z read as a doubled backslash.
        (
            "[programme.card_issuing]\nbin_prefix = '47617x'\n",
            "matching regex '^([0-9]{6,11})?$' - at",
        ),
        ("[nope]\n", "nope"),
        # Bounds a typo's extra digits used to pass (then: every approval 96, a disk filled
        # with zeros, an OverflowError from LMDB), names that are no variable, an empty path.
        ("[programme]\nhold_lifetime_seconds = 100000000000000000\n", "hold_lifetime_seconds"),
        ("[programme.hold_lifetime_by_mcc]\n7011 = 10000000000000\n", "hold_lifetime_by_mcc"),
        ("[ledger]\nwrite_ahead_log_bytes = 1099511627776000\n", "write_ahead_log_bytes"),
        ("[ledger]\nmap_size_bytes = 18446744073709551616\n", "$.ledger.map_size_bytes"),
        # Past what an x86-64 process can map: the open failed without naming the key.
        ("[ledger]\nmap_size_bytes = 281474976710656\n", "$.ledger.map_size_bytes"),
        # A window of 2^63 times: every link failed as it opened, silently.
        (
            "[[listeners]]\nname = 'n'\nport = 0\nbad_messages_max = 9223372036854775808\n",
            "$.listeners[0].bad_messages_max",
        ),
        ("[retention]\nidempotency_seconds = 1000000000000\n", "$.retention.idempotency_seconds"),
        ("[ledger]\npath = ''\n", "$.ledger.path"),
        ("[security]\npan_key_env = ''\n", "$.security.pan_key_env"),
        ("[http]\napi_token_env = 'MY TOKEN'\n", "$.http.api_token_env"),
        (
            "[[webhooks.endpoints]]\nname = 'h'\nurl = 'http://127.0.0.1:1/'\n"
            "secret_envs = ['S']\nevent_types = ['authorisation.aproved']\n",
            "$.webhooks.endpoints[0].event_types[0]",
        ),
    ],
)
def test_bad_config_names_the_key(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "test.toml")
    assert named in str(caught.value)
    assert "test.toml" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("[[listeners]]\nname = 'a'\nport = 70000\n", "(got 70000)"),
        ("[server]\nworkers = 'four'\n", "(got 'four')"),
        ("[[listeners]]\nname = 'Network A'\n", "(got 'Network A')"),
        ("[ledger]\npath = ''\n", "(got '')"),
    ],
)
def test_a_bad_value_is_shown_beside_its_key(text: str, shown: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "test.toml")
    assert str(caught.value).endswith(shown)


@pytest.mark.parametrize(
    ("text", "shown", "hidden"),
    [
        (
            "[[webhooks.endpoints]]\nname = 'a'\nurl = ' https://user:hunter2@hooks.example/'\n"
            "secret_envs = ['S']\n",
            "(got a string of 36 characters)",
            "hunter2",
        ),
        ("[security]\npan_key_env = 'not a name'\n", "(got a string of 10 characters)", "not a"),
        (
            "[programme.card_issuing]\nbin_prefix = '4761739001010010'\n",
            "(got '476173******0010')",
            "4761739001010010",
        ),
    ],
)
def test_a_bad_value_that_may_be_a_secret_is_not_shown(text: str, shown: str, hidden: str) -> None:
    # A webhook URL may carry credentials or a token; a variable's name may be the secret
    # pasted in its place; a card number is masked wherever it turns up.
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "test.toml")
    assert str(caught.value).endswith(shown) and hidden not in str(caught.value)


def test_an_empty_ledger_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match="--ledger: an empty path"):
        with_overrides(Config(), ledger_path="")


def test_bad_time_zone_names_the_key_and_the_value() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("[programme]\ntime_zone = 'Mars/Olympus'\n", "test.toml")
    message = str(caught.value)
    assert "$.programme" in message and "time_zone" in message and "Mars/Olympus" in message


def test_programme_blocked_mccs_is_no_longer_a_config_key() -> None:
    # Programme-level MCC blocks are programme controls in the ledger now; a config that still
    # names the old key must fail loudly rather than be silently ignored.
    with pytest.raises(ConfigError, match=r"unknown field `blocked_mccs` - at `\$\.programme`"):
        parse_config("[programme]\nblocked_mccs = ['7995']\n", "test.toml")


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="prot"):
        parse_config("[server]\nprot = 1\n")


def test_invalid_toml() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[server\n")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/processor.toml")


def test_overrides_isolate_an_instance() -> None:
    config = with_overrides(Config(), ledger_path="/tmp/x", port=0, http_port=0)
    assert (config.ledger.path, config.listeners[0].port, config.http.port) == ("/tmp/x", 0, 0)
    assert config.listeners[0].framing == Config().listeners[0].framing


TWO_LISTENERS = """
[[listeners]]
name = "visa"
port = 8583
[[listeners]]
name = "acquirer-b"
port = 8584
framing = "len2_inclusive"
bitmap = "binary"
"""


def test_several_listeners_each_keep_their_dialect() -> None:
    config = parse_config(TWO_LISTENERS)
    assert [(each.name, each.port, each.framing, each.bitmap) for each in config.listeners] == [
        ("visa", 8583, "len2", "ascii"),
        ("acquirer-b", 8584, "len2_inclusive", "binary"),
    ]
    isolated = with_overrides(config, port=0)
    assert [each.port for each in isolated.listeners] == [0, 0]
    assert isolated.listeners[1].bitmap == "binary"


def test_a_nonzero_port_flag_is_ambiguous_with_several_listeners() -> None:
    with pytest.raises(ConfigError, match="--port 9000: the config has 2 listeners"):
        with_overrides(parse_config(TWO_LISTENERS), port=9000)


def test_seed_demo_data_is_no_longer_a_config_key() -> None:
    with pytest.raises(ConfigError, match=r"\$\.ledger\.seed_demo_data has moved: .*--demo"):
        parse_config("[ledger]\nseed_demo_data = true\n")


def test_the_card_issuing_bin_has_no_default() -> None:
    assert Config().programme.card_issuing.bin_prefix == ""
    assert parse_config("[programme.card_issuing]\nbin_prefix = '476173'\n")


@pytest.mark.parametrize(
    "key", ["host", "port", "framing", "header_bytes", "bitmap", "bad_message_budget"]
)
def test_the_old_single_server_address_gets_a_migration_note(key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"[server]\n{key} = 1\n", "old.toml")
    message = str(caught.value)
    assert f"old.toml: $.server.{key} has moved" in message and "[[listeners]]" in message


def test_override_port_range() -> None:
    with pytest.raises(ConfigError, match="--port"):
        with_overrides(Config(), port=70000)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[[rates]]\nfrom = "USD"\nto = "EUR"\nrate = "abc"\n', "$.rates[0].rate"),
        ('[[rates]]\nfrom = "USD"\nto = "EUR"\nrate = "-1"\n', "$.rates[0].rate"),
        ('[[rates]]\nfrom = "XXX"\nto = "EUR"\nrate = "1"\n', "$.rates[0].from"),
        ('[[rates]]\nfrom = "USD"\nto = "EUX"\nrate = "1"\n', "$.rates[0].to"),
        ('[[rates]]\nfrom = "USD"\nto = "EUR"\nrate = 0.92\n', "$.rates[0].rate"),
        ('[[rates]]\nfrom = "USD"\nto = "EUR"\nrat = "1"\n', "$.rates[0]"),
        (
            '[[rates]]\nfrom = "USD"\nto = "EUR"\nrate = "1"\n'
            '[[rates]]\nfrom = "USD"\nto = "EUR"\nrate = "2"\n',
            "$.rates[1]",
        ),
    ],
)
def test_bad_rates_file_names_the_entry(tmp_path: Path, text: str, named: str) -> None:
    from processor.rates import load_rates

    path = tmp_path / "rates.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_rates(path)
    assert named in str(caught.value)


def test_example_rates_file_loads() -> None:
    from decimal import Decimal

    from processor.rates import load_rates

    rates = load_rates(ROOT / "config" / "rates.example.toml")
    assert rates[("USD", "EUR")] == Decimal("0.9200")


ENDPOINT = '[[webhooks.endpoints]]\nname = "main"\nurl = "https://hooks.example/"\n'


def test_an_endpoint_names_one_or_more_secret_variables() -> None:
    config = parse_config(ENDPOINT + 'secret_envs = ["HOOK_OLD", "HOOK_NEW"]\n')
    assert config.webhooks.endpoints[0].secret_envs == ("HOOK_OLD", "HOOK_NEW")


@pytest.mark.parametrize(
    ("secret_envs", "message"),
    [
        ("[]", r"Expected `array` of length >= 1 - at `\$\.webhooks\.endpoints\[0\]\.secret_envs`"),
        (
            '["A", "B", "C", "D", "E"]',
            r"Expected `array` of length <= 4 - at `\$\.webhooks\.endpoints\[0\]\.secret_envs`",
        ),
        ('["A", ""]', r"at `\$\.webhooks\.endpoints\[0\]\.secret_envs\[1\]`"),
        (
            '["HOOK_A", "HOOK_A"]',
            r"secret_envs names 'HOOK_A' more than once - at `\$\.webhooks\.endpoints\[0\]`",
        ),
        (
            '"HOOK_A"',
            r"Expected `array`, got `str` - at `\$\.webhooks\.endpoints\[0\]\.secret_envs`",
        ),
    ],
)
def test_bad_secret_variables_are_named(secret_envs: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(ENDPOINT + f"secret_envs = {secret_envs}\n", "test.toml")


def test_the_old_single_secret_key_fails_and_says_what_replaces_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(ENDPOINT + 'secret_env = "HOOK_A"\n', "test.toml")
    message = str(caught.value)
    assert "unknown field `secret_env` - at `$.webhooks.endpoints[0]`" in message
    assert 'secret_env` is now secret_envs = ["VARIABLE"]' in message


def test_a_map_above_the_default_ceiling_is_its_own_ceiling() -> None:
    big = parse_config("[ledger]\nmap_size_bytes = 107374182400\n", "test.toml")  # 100 GiB
    assert big.ledger.map_ceiling_bytes == 100 << 30
    assert Config().ledger.map_ceiling_bytes == 64 << 30
    chosen = parse_config("[ledger]\nmap_size_max_bytes = 2147483648\n", "test.toml")
    assert chosen.ledger.map_ceiling_bytes == 2 << 30
