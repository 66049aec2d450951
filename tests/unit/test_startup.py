"""What a production start requires, and what --demo fills in instead."""

import secrets
from pathlib import Path

import msgspec
import pytest

from processor import development_keys, limits
from processor.app import open_ledger
from processor.config import DEMO_BIN_PREFIX, Config, parse_config
from processor.cvc2 import INSECURE_DEVELOPMENT_CVK
from processor.ledger.store import LedgerError, claim_for_daemon
from processor.security import INSECURE_DEVELOPMENT_KEY, PanHasher
from processor.server import startup
from processor.server.startup import Unready, start_settings

KEY = "startup-test-pan-key-of-32-bytes+"  # a secret of the minimum length, not one character
TOKEN = "t" * limits.api_token_chars_min
CVK = "89ABCDEF0123456776543210FEDCBA98"
WITH_BIN = parse_config(
    "[programme.card_issuing]\nbin_prefix = '53999900'\n"
    "[[security.card_verification_keys]]\nbin_prefix = '539999'\nkey_envs = ['CVK_5399']\n"
)
DATA_KEY = "aa" * 32
READY = {
    "PROCESSOR_PAN_KEY": KEY,
    "PROCESSOR_API_TOKEN": TOKEN,
    "CVK_5399": CVK,
    "PROCESSOR_DATA_KEY": DATA_KEY,
    "PROCESSOR_PAN_VAULT_KEY": "bb" * 32,
}


def unready(config: Config, environ: dict[str, str]) -> str:
    with pytest.raises(Unready) as caught:
        start_settings(config, environ, demo=False)
    return str(caught.value)


def test_everything_set_starts_with_exactly_that() -> None:
    settings = start_settings(WITH_BIN, READY, demo=False)
    assert settings.hasher.fingerprint == PanHasher(KEY.encode()).fingerprint
    assert not settings.hasher.insecure
    assert settings.api_token == TOKEN and not settings.generated_token
    assert settings.config == WITH_BIN and not settings.demo


def test_nothing_set_names_all_three_in_one_line() -> None:
    message = unready(Config(), {})
    assert "\n" not in message
    assert "PROCESSOR_PAN_KEY is not set" in message
    assert "PROCESSOR_API_TOKEN is not set" in message
    assert "programme.card_issuing.bin_prefix is not set" in message
    assert "--demo" in message


def test_a_pan_key_one_byte_short_is_refused() -> None:
    secret = secrets.token_hex(limits.pan_key_bytes_min)[: limits.pan_key_bytes_min - 1]
    message = unready(WITH_BIN, dict(READY, PROCESSOR_PAN_KEY=secret))
    assert f"PROCESSOR_PAN_KEY holds {limits.pan_key_bytes_min - 1} bytes" in message
    assert secret[:8] not in message  # a secret is never quoted, not even in part


def test_a_pan_key_that_is_not_utf8_is_used_as_the_bytes_it_is() -> None:
    """os.environ decodes a variable with surrogateescape; encoding it back strictly crashed
    the start with a traceback. Its bytes are the key."""
    raw = bytes(range(128, 168))
    settings = start_settings(
        WITH_BIN, dict(READY, PROCESSOR_PAN_KEY=raw.decode("utf-8", "surrogateescape")), demo=False
    )
    assert settings.hasher.fingerprint == PanHasher(raw).fingerprint


def test_the_settings_never_show_the_token() -> None:
    settings = start_settings(WITH_BIN, READY, demo=False)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)


def test_an_api_token_one_character_short_is_refused() -> None:
    message = unready(WITH_BIN, dict(READY, PROCESSOR_API_TOKEN=TOKEN[:-1]))
    assert f"PROCESSOR_API_TOKEN holds {limits.api_token_chars_min - 1} characters" in message
    assert "http.control_api = false" in message


@pytest.mark.parametrize(
    "token", [TOKEN + "\n", " " * len(TOKEN), " " + TOKEN, TOKEN + "\x01", TOKEN + "é"]
)
def test_an_api_token_no_header_can_carry_is_refused(token: str) -> None:
    # A trailing line end (a token read from a secret file) passed the length check, and then
    # every call was 401: the header cannot carry it, and the guard strips what is around.
    message = unready(WITH_BIN, dict(READY, PROCESSOR_API_TOKEN=token))
    assert "PROCESSOR_API_TOKEN starts or ends with a space or a line end" in message
    assert TOKEN not in message


def test_an_api_token_with_spaces_inside_is_accepted() -> None:
    # The guard matches it (only what surrounds the credentials is stripped): it worked.
    token = "correct horse battery staple"
    assert start_settings(WITH_BIN, dict(READY, PROCESSOR_API_TOKEN=token), demo=False).api_token


def test_the_variables_named_in_the_config_are_the_ones_checked() -> None:
    config = parse_config(
        "[security]\npan_key_env = 'MY_KEY'\npersonal_data_key_envs = ['MY_DATA']\n"
        "[http]\napi_token_env = 'MY_TOKEN'\n"
        "[programme.card_issuing]\nbin_prefix = '53999900'\n"
        "[[security.card_verification_keys]]\nbin_prefix = '539999'\nkey_envs = ['MY_CVK']\n"
    )
    message = unready(config, READY)
    assert "MY_KEY is not set" in message and "MY_TOKEN is not set" in message
    assert "key_envs[0]: MY_CVK is not set" in message and "(MY_DATA) is not set" in message
    mine = {"MY_KEY": KEY, "MY_TOKEN": TOKEN, "MY_CVK": CVK, "MY_DATA": DATA_KEY}
    mine["PROCESSOR_PAN_VAULT_KEY"] = "bb" * 32
    settings = start_settings(config, mine, demo=False)
    assert settings.api_token == TOKEN


def test_with_the_control_api_off_no_token_is_needed() -> None:
    config = msgspec.structs.replace(
        WITH_BIN, http=msgspec.structs.replace(WITH_BIN.http, control_api=False)
    )
    environ = {"PROCESSOR_PAN_KEY": KEY, "CVK_5399": CVK, "PROCESSOR_DATA_KEY": DATA_KEY}
    settings = start_settings(config, environ, demo=False)
    assert settings.api_token is None


def test_demo_fills_in_what_is_missing() -> None:
    settings = start_settings(Config(), {}, demo=True)
    assert settings.hasher.insecure
    assert settings.hasher.fingerprint == PanHasher(INSECURE_DEVELOPMENT_KEY).fingerprint
    assert settings.generated_token and settings.api_token is not None
    assert len(settings.api_token) >= limits.api_token_chars_min
    assert settings.config.programme.card_issuing.bin_prefix == DEMO_BIN_PREFIX
    again = start_settings(Config(), {}, demo=True)
    assert again.api_token != settings.api_token  # made up afresh, never a fixed demo secret


def test_demo_keeps_what_is_set_and_still_refuses_a_short_key() -> None:
    settings = start_settings(WITH_BIN, READY, demo=True)
    assert not settings.hasher.insecure and settings.api_token == TOKEN
    assert not settings.generated_token
    assert settings.config.programme.card_issuing.bin_prefix == "53999900"
    with pytest.raises(Unready, match="PROCESSOR_PAN_KEY holds 5 bytes"):
        start_settings(WITH_BIN, dict(READY, PROCESSOR_PAN_KEY="short"), demo=True)


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    # In a child process: lowering our own soft limit would outlive the test.
    import subprocess
    import sys

    script = (
        "import resource\n"
        "from processor.server.startup import raise_open_files_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "before, after = raise_open_files_limit()\n"
        "print(before, after, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    before, after, now, hard = (int(value) for value in done.stdout.split())
    assert before == 64
    expected = hard if hard != -1 else limits.open_files_wanted  # -1: RLIM_INFINITY
    assert after == now == expected


def test_listening_sockets_take_the_family_of_their_host() -> None:
    import socket

    from processor.server.daemon import StartupError, listen

    ipv4 = listen("127.0.0.1", 0, name="HTTP")
    try:
        assert ipv4.family == socket.AF_INET
        with pytest.raises(StartupError, match=r"^cannot listen on 127\.0\.0\.1:\d+ \(HTTP\): "):
            listen("127.0.0.1", ipv4.getsockname()[1], name="HTTP")  # taken
    finally:
        ipv4.close()
    try:
        ipv6 = listen("::1", 0)  # loopback only, as tests must
    except StartupError:
        return  # no IPv6 loopback on this machine
    try:
        assert ipv6.family == socket.AF_INET6
    finally:
        ipv6.close()


def test_the_issuing_bin_needs_a_card_verification_key() -> None:
    config = parse_config("[programme.card_issuing]\nbin_prefix = '53999900'\n")
    message = unready(config, READY)
    assert "no card verification key for BIN 53999900" in message
    # With the control API off nothing is issued, so nothing is needed.
    off = msgspec.structs.replace(
        config, http=msgspec.structs.replace(config.http, control_api=False)
    )
    assert start_settings(off, READY, demo=False).card_keys.issuing("5399990000000000") is None


def test_the_keys_are_read_and_issue_for_their_range() -> None:
    settings = start_settings(WITH_BIN, READY, demo=False)
    issuing = settings.card_keys.issuing("5399990012345678")
    assert issuing is not None and issuing[1] == bytes.fromhex(CVK)
    assert CVK not in repr(settings.card_keys) and CVK.lower() not in repr(settings.card_keys)


def test_demo_gives_the_issuing_bin_the_development_key_and_only_demo_may() -> None:
    settings = start_settings(Config(), {}, demo=True)
    [added] = settings.config.security.card_verification_keys
    assert added.bin_prefix == DEMO_BIN_PREFIX and added.development_key
    issuing = settings.card_keys.issuing(DEMO_BIN_PREFIX + "9001010085")
    assert issuing is not None and issuing[1] == INSECURE_DEVELOPMENT_CVK
    development = parse_config(
        "[programme.card_issuing]\nbin_prefix = '53999900'\n"
        "[[security.card_verification_keys]]\nbin_prefix = '539999'\ndevelopment_key = true\n"
    )
    assert "development_key is the published development key: --demo only" in unready(
        development, READY
    )


def test_the_personal_data_key_is_required_outside_demo_and_named_when_wrong() -> None:
    missing = unready(WITH_BIN, {k: v for k, v in READY.items() if k != "PROCESSOR_DATA_KEY"})
    assert "personal_data_key_envs[0] (PROCESSOR_DATA_KEY) is not set" in missing
    short = unready(WITH_BIN, dict(READY, PROCESSOR_DATA_KEY="ab" * 16))
    assert "holds 16 bytes; AES-256 needs 32" in short and "ab" * 16 not in short
    settings = start_settings(WITH_BIN, READY, demo=False)
    assert settings.personal_data is not None and not settings.personal_data.insecure
    assert DATA_KEY not in repr(settings.personal_data)
    demo = start_settings(Config(), {}, demo=True)
    assert demo.personal_data is not None and demo.personal_data.insecure


def test_the_pan_vault_key_is_required_outside_demo() -> None:
    missing = unready(WITH_BIN, {k: v for k, v in READY.items() if k != "PROCESSOR_PAN_VAULT_KEY"})
    assert "pan_vault_key_envs[0] (PROCESSOR_PAN_VAULT_KEY) is not set" in missing
    settings = start_settings(WITH_BIN, READY, demo=False)
    assert settings.pan_vault is not None and not settings.pan_vault.insecure
    assert "bb" * 32 not in repr(settings.pan_vault)
    demo = start_settings(Config(), {}, demo=True)
    assert demo.pan_vault is not None and demo.pan_vault.insecure


@pytest.mark.parametrize(
    ("variable", "published"),
    [
        ("PROCESSOR_PAN_KEY", development_keys.PAN_KEY.decode()),
        ("PROCESSOR_PAN_KEY", development_keys.PAN_VAULT_KEY.hex()),
        ("PROCESSOR_DATA_KEY", development_keys.PAN_VAULT_KEY.hex()),
        ("PROCESSOR_PAN_VAULT_KEY", development_keys.PERSONAL_DATA_KEY.hex()),
        ("CVK_5399", development_keys.CARD_VERIFICATION_KEY.hex()),
    ],
)
def test_no_published_development_key_is_taken_outside_demo(variable: str, published: str) -> None:
    """The published PAN key started a production daemon (a card id and masked PAN then give
    back the PAN in seconds), and each AES key was refused only in its own slot."""
    message = unready(WITH_BIN, dict(READY, **{variable: published}))
    assert "published development key" in message, message
    assert published not in message


@pytest.mark.parametrize("setting", ["server.cpus", "webhooks.delivery_cpus"])
def test_a_cpu_this_process_may_not_run_on_is_refused_by_its_key(setting: str) -> None:
    import os

    missing = os.cpu_count() or 1  # numbered from 0: one past the last
    table, key = setting.split(".")
    config = parse_config(f"[{table}]\n{key} = [{missing}]\n")
    before = os.sched_getaffinity(0)
    message = unready(config, READY)
    assert message.startswith(f"{setting}: CPU {missing} is not one this machine (or its")
    assert os.sched_getaffinity(0) == before  # the check put the mask back
    # --demo does not excuse it: it is no secret to fill in.
    with pytest.raises(Unready, match=setting):
        start_settings(config, {}, demo=True)
    usable = parse_config(f"[{table}]\n{key} = [{min(os.sched_getaffinity(0))}]\n")
    assert start_settings(usable, {}, demo=True).config.server == usable.server


@pytest.mark.parametrize("workers", [1, 2])
def test_a_daemon_claims_its_ledger_whatever_its_workers(tmp_path: Path, workers: int) -> None:
    """Only the write-ahead log's lock said "one daemon per ledger", and only a daemon of one
    worker (with fsync) logs: a second daemon of two workers started and answered beside the
    first, with a second sweeper, retention and webhook delivery on one outbox."""
    config = parse_config(
        f"[ledger]\npath = '{tmp_path / 'ledger'}'\ndurability = 'process'\n"
        f"[server]\nworkers = {workers}\n"
    )
    ledger = open_ledger(config, PanHasher(KEY.encode()), serving=True)
    try:
        with pytest.raises(LedgerError, match="another daemon serves it already"):
            claim_for_daemon(tmp_path / "ledger")  # what a second daemon does first
    finally:
        ledger.close()
    again = open_ledger(config, PanHasher(KEY.encode()), serving=True)  # released on close
    again.close()


def test_one_secret_serves_one_role() -> None:
    # The PAN-hashing key as the API token went out in every API call's header.
    named_twice = parse_config(
        "[http]\napi_token_env = 'PROCESSOR_PAN_KEY'\n"
        "[programme.card_issuing]\nbin_prefix = '53999900'\n"
        "[[security.card_verification_keys]]\nbin_prefix = '539999'\nkey_envs = ['CVK_5399']\n"
    )
    message = unready(named_twice, READY)
    assert (
        "PROCESSOR_PAN_KEY is named by both security.pan_key_env and http.api_token_env" in message
    )
    same_value = dict(READY, PROCESSOR_PAN_VAULT_KEY=DATA_KEY)
    message = unready(WITH_BIN, same_value)
    assert (
        "PROCESSOR_PAN_VAULT_KEY (security.pan_vault_key_envs) holds the same value as "
        "PROCESSOR_DATA_KEY (security.personal_data_key_envs)" in message
    )
    assert DATA_KEY not in message
    # The same key in hex of the other case is the same key (it passed as another secret).
    other_case = DATA_KEY.upper()  # "aa" * 32 as "AA" * 32
    assert other_case != DATA_KEY
    message = unready(WITH_BIN, dict(READY, PROCESSOR_PAN_VAULT_KEY=other_case))
    assert "PROCESSOR_PAN_VAULT_KEY (security.pan_vault_key_envs) holds the same value" in message
    # Secrets used as the text they are differ in another case: the PAN key's bytes, a token.
    hex_text = "ab" * 32  # a PAN key that happens to be hex is still used as its text
    token_in_other_case = dict(
        READY, PROCESSOR_PAN_KEY=hex_text, PROCESSOR_API_TOKEN=hex_text.upper()
    )
    problems: list[str] = []
    startup._one_role_per_secret(WITH_BIN, token_in_other_case, problems)
    assert problems == []
    # Rotation lists and a secret shared within a role are not a second role.
    hook = "[[webhooks.endpoints]]\nname = '{}'\nurl = 'http://127.0.0.1:9/'\nsecret_envs = ['H']\n"
    shared = parse_config(
        "[programme.card_issuing]\nbin_prefix = '53999900'\n"
        "[[security.card_verification_keys]]\nbin_prefix = '539999'\nkey_envs = ['CVK_5399']\n"
        + hook.format("a")
        + hook.format("b")
    )
    assert start_settings(shared, dict(READY, H="whsec_x"), demo=False).api_token == TOKEN


def test_the_readmes_production_recipe_starts() -> None:
    # It left out PROCESSOR_PAN_VAULT_KEY: followed to the letter, the daemon did not start.
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    recipe = readme[: readme.index("processor serve --config my-processor.toml")]
    recipe = recipe[recipe.rindex("```sh") :]
    exported = re.findall(r"(PROCESSOR_\w+)=\$\(openssl rand -hex (\d+)\)", recipe)
    assert len(exported) >= 5, recipe
    environ = {name: secrets.token_hex(int(size)) for name, size in exported}
    config = parse_config(
        '[programme.card_issuing]\nbin_prefix = "53999900"\n'
        '[[security.card_verification_keys]]\nbin_prefix = "539999"\n'
        'key_envs = ["PROCESSOR_CVK_539999"]\n'
    )
    assert start_settings(config, environ, demo=False).api_token == environ["PROCESSOR_API_TOKEN"]
