"""What `processor serve` needs before it opens anything: secrets and the card-issuing BIN.

Outside `--demo` a daemon without a PAN key of full strength, without a control API token (while
the API is on) or without the BIN its virtual cards are issued in does not start: each would be
a silent hazard in production (guessable card keys, an API nobody can use or anyone can guess,
cards issued in a test BIN). `--demo` fills in what is missing instead, and says so.
"""

from __future__ import annotations

import logging
import resource
import secrets
import string
from typing import Final

import msgspec

from processor import limits
from processor.config import DEMO_BIN_PREFIX, CardVerificationRange, Config
from processor.cpus import unavailable_cpus
from processor.cvc2 import NO_KEYS, CardVerificationError, CardVerificationKeys
from processor.cvc2 import keys_from_environment as card_keys_from_environment
from processor.development_keys import is_published
from processor.pan_vault import PanVault, VaultError, vault_from_environment
from processor.personal_data import PersonalDataCipher, PersonalDataError, cipher_from_environment
from processor.security import (
    INSECURE_DEVELOPMENT_KEY,
    PanHasher,
    key_from_environment,
    pan_key_weakness,
)

log = logging.getLogger("processor.daemon")


class Unready(Exception):
    """Settings missing for a production start; the message names each and how to set it."""


class StartSettings(msgspec.Struct, frozen=True):
    config: Config  # with the demo BIN filled in under --demo
    hasher: PanHasher
    api_token: str | None  # None: the control API is switched off (http.control_api = false)
    demo: bool
    generated_token: bool  # --demo made up the token: announce it once
    card_keys: CardVerificationKeys = NO_KEYS
    personal_data: PersonalDataCipher | None = None
    pan_vault: PanVault | None = None

    def __repr__(self) -> str:  # a traceback or a debug print never shows the token
        return f"StartSettings(demo={self.demo}, api_token={'set' if self.api_token else None})"


def start_settings(config: Config, environ: dict[str, str], *, demo: bool) -> StartSettings:
    """Check (or, under `demo`, fill in) the PAN key, the API token and the card-issuing BIN."""
    problems: list[str] = []
    _one_role_per_secret(config, environ, problems)
    hasher = _pan_hasher(config, environ, demo, problems)
    token, generated = _api_token(config, environ, demo, problems)
    issuing = config.programme.card_issuing
    if not issuing.bin_prefix:
        if demo:
            issuing = msgspec.structs.replace(issuing, bin_prefix=DEMO_BIN_PREFIX)
            config = msgspec.structs.replace(
                config, programme=msgspec.structs.replace(config.programme, card_issuing=issuing)
            )
        else:
            problems.append(
                "programme.card_issuing.bin_prefix is not set: the BIN (6 to 11 digits) your "
                "virtual cards are issued in"
            )
    config = _card_verification(config, demo, token is not None, problems)
    card_keys = NO_KEYS
    try:
        card_keys = card_keys_from_environment(config.security.card_verification_keys, environ)
    except CardVerificationError as error:
        problems.append(str(error))
    personal_data = None
    pan_vault = None
    try:
        if config.http.control_api:  # cardholders are reached through it alone
            personal_data = cipher_from_environment(
                config.security.personal_data_key_envs, environ, demo=demo
            )
    except PersonalDataError as error:
        problems.append(str(error))
    try:
        if config.http.control_api:  # it issues the cards whose PANs the vault keeps
            pan_vault = vault_from_environment(
                config.security.pan_vault_key_envs, environ, demo=demo
            )
    except VaultError as error:
        problems.append(str(error))
    if pan_vault is not None and pan_vault.insecure:
        log.warning(
            "--demo: %s is not set: keeping issued cards' PANs under the INSECURE published "
            "development key. Never put real cards in it.",
            config.security.pan_vault_key_envs[0],
        )
    if personal_data is not None and personal_data.insecure:
        log.warning(
            "--demo: %s is not set: sealing cardholders' personal data with the INSECURE "
            "published development key. Never put real people in it.",
            config.security.personal_data_key_envs[0],
        )
    for setting, cpus in (
        ("server.cpus", config.server.cpus),
        ("webhooks.delivery_cpus", config.webhooks.delivery_cpus),
    ):
        wrong = unavailable_cpus(setting, cpus)
        if wrong is not None:
            raise Unready(wrong)  # not a secret --demo could fill in
    if problems:
        raise Unready("; ".join(problems) + " (or run `processor serve --demo` to try it out)")
    assert hasher is not None
    return StartSettings(
        config, hasher, token, demo, generated, card_keys, personal_data, pan_vault
    )


_HEX_KEY_ROLES: Final = frozenset(
    {"security.personal_data_key_envs", "security.pan_vault_key_envs"}
)


def _one_role_per_secret(config: Config, environ: dict[str, str], problems: list[str]) -> None:
    """Each secret does one job. One variable named for two (http.api_token_env =
    "PROCESSOR_PAN_KEY") sent the PAN-hashing key in every API call's header, where anyone
    who sees that traffic can then recover card numbers from their keyed hashes; two
    variables holding one value do the same. Rotation lists (several variables for one role)
    and one variable shared within a role (two endpoints' signing secret) are fine."""
    security = config.security
    roles: dict[str, tuple[str, ...]] = {
        "security.pan_key_env": (security.pan_key_env,),
        "security.card_verification_keys": tuple(
            variable for each in security.card_verification_keys for variable in each.key_envs
        ),
        "webhooks.endpoints[].secret_envs": tuple(
            variable for each in config.webhooks.endpoints for variable in each.secret_envs
        ),
    }
    if config.http.control_api:  # otherwise these are not read
        roles["http.api_token_env"] = (config.http.api_token_env,)
        roles["security.personal_data_key_envs"] = security.personal_data_key_envs
        roles["security.pan_vault_key_envs"] = security.pan_vault_key_envs
    role_of_variable: dict[str, str] = {}
    role_of_value: dict[str, tuple[str, str]] = {}
    for role, variables in roles.items():
        for variable in dict.fromkeys(variables):
            other = role_of_variable.setdefault(variable, role)
            if other != role:
                problems.append(f"{variable} is named by both {other} and {role}: one secret each")
                continue
            value = environ.get(variable, "")
            if not value:
                continue
            # The AES keys are read as hex: one in either case is one key. The others are
            # used as the text they are (the PAN key's bytes, a token compared as sent).
            hex_role = role in _HEX_KEY_ROLES and all(char in string.hexdigits for char in value)
            same = value.lower() if hex_role else value
            other_role, other_variable = role_of_value.setdefault(same, (role, variable))
            if other_role != role:
                problems.append(
                    f"{variable} ({role}) holds the same value as {other_variable} "
                    f"({other_role}): one secret each"
                )


def _card_verification(config: Config, demo: bool, api: bool, problems: list[str]) -> Config:
    """Virtual cards are issued with a CVC2: the issuing BIN needs a card verification key.
    `--demo` gives it the built-in development key when none is configured; outside it, that
    key is refused (anyone can compute its CVC2s)."""
    ranges = config.security.card_verification_keys
    for index, each in enumerate(ranges):
        if each.development_key and not demo:
            problems.append(
                f"security.card_verification_keys[{index}].development_key is the published "
                "development key: --demo only"
            )
    issuing = config.programme.card_issuing.bin_prefix
    if not issuing or not api or any(issuing.startswith(each.bin_prefix) for each in ranges):
        return config
    if not demo:
        problems.append(
            f"no card verification key for BIN {issuing}: cards issued through the control "
            "API need one for their CVC2 ([[security.card_verification_keys]] with bin_prefix "
            "and key_envs, hex double-length 3DES keys)"
        )
        return config
    log.warning(
        "--demo: no card verification key for BIN %s: using the INSECURE published development "
        "key; anyone can compute these cards' CVC2s. Never put real cards in it.",
        issuing,
    )
    demo_range = CardVerificationRange(bin_prefix=issuing, development_key=True)
    security = msgspec.structs.replace(
        config.security, card_verification_keys=(*ranges, demo_range)
    )
    return msgspec.structs.replace(config, security=security)


def _pan_hasher(
    config: Config, environ: dict[str, str], demo: bool, problems: list[str]
) -> PanHasher | None:
    variable = config.security.pan_key_env
    key = key_from_environment(variable, environ)
    if not key and demo:
        log.warning(
            "--demo: %s is not set: using the INSECURE built-in development PAN key; card keys "
            "in this ledger are guessable. Never put real cards in it.",
            variable,
        )
        return PanHasher(INSECURE_DEVELOPMENT_KEY, insecure=True)
    weakness = pan_key_weakness(variable, key)
    if weakness is not None and not (demo and is_published(key)):
        problems.append(weakness)
        return None
    return PanHasher(key)


def _api_token(
    config: Config, environ: dict[str, str], demo: bool, problems: list[str]
) -> tuple[str | None, bool]:
    if not config.http.control_api:
        return None, False
    variable = config.http.api_token_env
    token = environ.get(variable, "")
    if not token and demo:
        return secrets.token_urlsafe(24), True
    if len(token) < limits.api_token_chars_min:
        what = "is not set" if not token else f"holds {len(token)} characters"
        problems.append(
            f"{variable} {what}: the control API needs a bearer token of at least "
            f"{limits.api_token_chars_min} characters (or set http.control_api = false)"
        )
        return None, False
    if token != token.strip() or not all(" " <= character <= "~" for character in token):
        # A header carries no line end or control character, and the guard strips the spaces
        # around what it is sent: a token read from a file with its line end, say, could never
        # be matched (every call 401). Spaces inside it do match. Said here rather than found
        # at the first call; the token itself is not quoted.
        problems.append(
            f"{variable} starts or ends with a space or a line end, or holds a control or a "
            "non-ASCII character: no Authorization header can carry it as it is"
        )
        return None, False
    return token, False


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit of open files to the hard one; (before, after).

    The default soft limit (often 1,024) is below what links_max links, the ledger, the HTTP
    port and the webhook connections need together: past it, accept() fails with EMFILE and
    links are refused without a word. The hard limit is the operator's to set.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, limits.open_files_wanted)
    if soft == resource.RLIM_INFINITY or target <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        log.warning("could not raise the open files limit from %d to %d: %s", soft, target, error)
        return soft, soft
    return soft, target
