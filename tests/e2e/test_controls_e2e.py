"""Spend controls over ISO 8583 against the real daemon, each refusal checked by its machine reason.

Each test loads its own accounts and cards (`processor ledger load`, while the daemon runs) into
a fresh ledger, sends authorisations on a real link and reads the reasons back from the events
the daemon committed (`processor events list`) or from /metrics.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from harness import PAN_KEY, Link, RunningDaemon, authorization, run_cli

from processor.ledger.store import Ledger
from processor.metrics import reason_family
from processor.sim.scenarios import SCENARIOS

pytestmark = pytest.mark.e2e

# Test PANs (Luhn-valid, the demo BIN, outside the demo cards' range).
CARD_A = "4761739001020019"
CARD_B = "4761739001020027"
CARD_C = "4761739001020035"
LOAD_CARD = "4761739001010085"  # demo-main, no card controls
API_TOKEN = "e2e-control-api-token"


def load(daemon: RunningDaemon, tmp_path: Path, text: str) -> None:
    path = tmp_path / "controls.toml"
    path.write_text(text)
    result = run_cli("ledger", "load", "--ledger", str(daemon.ledger), str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def account(controls: str = "") -> str:
    """An EUR account with a large balance, so only controls decline."""
    text = '[[accounts]]\nid = "e2e-controls"\ncurrency = "EUR"\nbalance = 100000000\n'
    return text + (controls and f"{controls}\n") + "\n"


def card(pan: str, controls: str = "") -> str:
    text = f'[[cards]]\npan = "{pan}"\naccount = "e2e-controls"\nexpiry = "3012"\n'
    return text + (controls and f"{controls}\n") + "\n"


def reasons(daemon: RunningDaemon) -> dict[str, tuple[str, str]]:
    """STAN -> (response code, reason) of every authorisation event the daemon committed."""
    result = run_cli("events", "list", "--ledger", str(daemon.ledger), "--limit", "10000")
    assert result.returncode == 0, result.stderr
    found: dict[str, tuple[str, str]] = {}
    for line in result.stdout.splitlines():
        event = json.loads(line)
        if event["type"] in ("authorization.approved", "authorization.declined"):
            data = event["data"]
            found[data["network"]["stan"]] = (data["response_code"], data["reason"])
    return found


def original_data(request: dict[str, str]) -> str:
    return f"{request['t']}{request['11']}{request['7']}{int(request['32']):011d}{0:011d}"


def reverse(link: Link, original: dict[str, str]) -> None:
    reversal = authorization(pan=original["2"], amount=int(original["4"]))
    reversal.update({"t": "0400", "90": original_data(original)})
    response = link.exchange(reversal)
    assert (response["t"], response["39"]) == ("0410", "00")


class Sent:
    """Authorisations sent on one link, to check their reasons in one read of the events."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.expected: dict[str, tuple[str, str]] = {}

    def swipe(self, pan: str, amount: int, code: str, reason: str, **fields: str) -> dict[str, str]:
        request = authorization(pan=pan, amount=amount, **fields)
        response = self.link.exchange(request)
        assert response["39"] == code, (pan[-4:], amount, fields, response["39"])
        self.expected[request["11"]] = (code, reason)
        return request

    def check_reasons(self, daemon: RunningDaemon) -> None:
        committed = reasons(daemon)
        assert {stan: committed.get(stan) for stan in self.expected} == self.expected


def field43(country: str) -> str:
    return f"{'E2E SHOP':<25}{'SOMEWHERE':<13}{country}"


def metric_reasons(daemon: RunningDaemon) -> Counter[str]:
    """Answers counted per machine reason family (all MTIs and codes), from /metrics.

    The label carries the family only (`country_not_allowed`, not `...:US`): a peer must not
    be able to grow the number of series. The full reason is in the answers and events.
    """
    url = f"http://127.0.0.1:{daemon.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counted: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("processor_requests_total{"):
            match = re.search(r'reason="([^"]*)"', line)
            assert match is not None, line
            counted[match.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    return counted


def test_daily_amount_limit_over_several_authorisations(
    daemon: RunningDaemon, link: Link, tmp_path: Path
) -> None:
    load(
        daemon,
        tmp_path,
        account()
        + card(
            CARD_A,
            'controls.amount_limits = [{ interval = "daily", amount = 10000, currency = "EUR" }]',
        ),
    )
    sent = Sent(link)
    first = sent.swipe(CARD_A, 4000, "00", "approved")
    sent.swipe(CARD_A, 4000, "00", "approved")
    sent.swipe(CARD_A, 4000, "61", "daily_amount_limit")  # 120.00 > 100.00
    reverse(link, first)  # gives its 40.00 back
    sent.swipe(CARD_A, 4000, "00", "approved")
    sent.swipe(CARD_A, 2001, "61", "daily_amount_limit")  # 100.01 > 100.00
    sent.swipe(CARD_A, 2000, "00", "approved")  # exactly the limit
    sent.check_reasons(daemon)


def test_trailing_count_limit_comes_back_by_reversal_and_by_time(
    daemon: RunningDaemon, link: Link, tmp_path: Path
) -> None:
    window = 2
    load(
        daemon,
        tmp_path,
        account()
        + card(CARD_A, f"controls.count_limits = [{{ count = 2, window_seconds = {window} }}]"),
    )
    sent = Sent(link)
    first = sent.swipe(CARD_A, 100, "00", "approved")
    sent.swipe(CARD_A, 100, "00", "approved")
    sent.swipe(CARD_A, 100, "65", "trailing_count_limit")
    reverse(link, first)  # a reversed approval no longer counts
    sent.swipe(CARD_A, 100, "00", "approved")
    sent.swipe(CARD_A, 100, "65", "trailing_count_limit")
    # Every approval above was answered before this sleep starts, so once it ends they are all
    # older than the window, whatever the machine's speed.
    time.sleep(window + 0.5)
    sent.swipe(CARD_A, 100, "00", "approved")
    sent.check_reasons(daemon)


def test_category_controls(daemon: RunningDaemon, link: Link, tmp_path: Path) -> None:
    load(
        daemon,
        tmp_path,
        account()
        + card(CARD_A, 'controls.blocked_categories = ["digital_goods"]')
        + card(
            CARD_B, 'controls.allowed_categories = ["groceries"]\ncontrols.allowed_mccs = ["5912"]'
        )
        + card(
            CARD_C,
            'controls.amount_limits = [{ interval = "daily", amount = 20000, currency = "EUR", '
            'categories = ["cash"] }]',
        ),
    )
    sent = Sent(link)
    sent.swipe(CARD_A, 500, "57", "mcc_category_blocked:digital_goods", **{"18": "5815"})
    sent.swipe(CARD_A, 500, "00", "approved", **{"18": "5411"})
    sent.swipe(CARD_B, 500, "57", "mcc_not_allowed", **{"18": "5812"})
    sent.swipe(CARD_B, 500, "00", "approved", **{"18": "5411"})
    sent.swipe(CARD_B, 500, "00", "approved", **{"18": "5912"})
    # The programme's gambling block (demo.toml) holds on every card, allow-list or not.
    sent.swipe(CARD_B, 500, "57", "mcc_category_blocked:gambling", **{"18": "7995"})
    atm = {"3": "010000", "18": "6011"}
    sent.swipe(CARD_C, 15000, "00", "approved", **atm)
    sent.swipe(CARD_C, 5001, "61", "daily_amount_limit:cash", **atm)  # 200.01 > 200.00
    sent.swipe(CARD_C, 50000, "00", "approved")  # groceries: not cash, not limited
    sent.check_reasons(daemon)


def test_country_controls(daemon: RunningDaemon, link: Link, tmp_path: Path) -> None:
    load(
        daemon,
        tmp_path,
        account()
        + card(CARD_A, 'controls.allowed_countries = ["eea"]\ncontrols.blocked_countries = ["FR"]'),
    )
    sent = Sent(link)
    sent.swipe(CARD_A, 500, "00", "approved", **{"43": field43("NO")})  # EEA, not EU
    sent.swipe(CARD_A, 500, "00", "approved", **{"43": field43("DE")})
    sent.swipe(CARD_A, 500, "57", "country_not_allowed:US", **{"43": field43("US")})
    sent.swipe(CARD_A, 500, "57", "country_blocked:FR", **{"43": field43("FR")})
    sent.swipe(CARD_A, 500, "57", "country_unknown")  # no field 43: no country to allow
    sent.check_reasons(daemon)


def test_channel_switches(daemon: RunningDaemon, link: Link, tmp_path: Path) -> None:
    load(
        daemon,
        tmp_path,
        account() + card(CARD_A, "controls.channels = { ecommerce = false, atm_cash = false }"),
    )
    sent = Sent(link)
    sent.swipe(CARD_A, 500, "57", "channel_blocked:ecommerce", **{"22": "812", "25": "59"})
    # Field 25 = 59 (e-commerce) decides even when field 22 says the PAN was keyed.
    sent.swipe(CARD_A, 500, "57", "channel_blocked:ecommerce", **{"22": "012", "25": "59"})
    sent.swipe(CARD_A, 500, "57", "channel_blocked:atm_cash", **{"3": "010000", "18": "6011"})
    sent.swipe(CARD_A, 500, "00", "approved", **{"22": "051", "25": "00"})  # chip
    sent.swipe(CARD_A, 500, "00", "approved", **{"22": "071", "25": "00"})  # contactless
    sent.swipe(CARD_A, 500, "00", "approved", **{"22": "012", "25": "08"})  # mail order
    sent.check_reasons(daemon)


def test_strong_customer_authentication_on_a_card(
    daemon: RunningDaemon, link: Link, tmp_path: Path
) -> None:
    psd2 = (
        'controls.require_sca = { currency = "EUR", low_value_max = 3000, '
        "low_value_total_max = 10000, low_value_count_max = 5 }"
    )
    load(daemon, tmp_path, account() + card(CARD_A, psd2))
    online = {"22": "812", "25": "59"}
    sent = Sent(link)
    sent.swipe(CARD_A, 5_000, "1A", "sca_required", **online)  # a Visa-range card: 1A
    sent.swipe(CARD_A, 5_000, "00", "approved", **online, **{"48": "R4203212"})  # 3-D Secure
    sent.swipe(CARD_A, 2_000, "00", "approved", **online)  # low value: exempt
    sent.swipe(CARD_A, 5_000, "00", "approved", **online, **{"48": "R220201"})  # MIT
    sent.swipe(CARD_A, 5_000, "00", "approved", **{"22": "051", "25": "00"})  # chip: in person
    sent.check_reasons(daemon)


def test_account_limit_counts_every_card_of_the_account(
    daemon: RunningDaemon, link: Link, tmp_path: Path
) -> None:
    load(
        daemon,
        tmp_path,
        account(
            'controls.amount_limits = [{ interval = "daily", amount = 10000, currency = "EUR" }]'
        )
        + card(CARD_A)
        + card(CARD_B),
    )
    sent = Sent(link)
    sent.swipe(CARD_A, 6000, "00", "approved")
    sent.swipe(CARD_B, 6000, "61", "daily_amount_limit")  # 60.00 + 60.00 > 100.00
    second = sent.swipe(CARD_B, 4000, "00", "approved")
    sent.swipe(CARD_A, 1, "61", "daily_amount_limit")
    reverse(link, second)
    sent.swipe(CARD_A, 4000, "00", "approved")
    sent.check_reasons(daemon)


def test_programme_controls_from_the_load_file(
    daemon: RunningDaemon, link: Link, tmp_path: Path
) -> None:
    load(
        daemon,
        tmp_path,
        "[programme_controls]\n"
        'blocked_categories = ["gambling", "adult"]\n'
        'blocked_countries = ["KP"]\n'
        'amount_limits = [{ interval = "per_authorization", amount = 200000, currency = "EUR" }]\n'
        "\n" + account() + card(CARD_A),
    )
    sent = Sent(link)
    for pan in (CARD_A, LOAD_CARD):  # every card of the programme, whatever its account
        sent.swipe(pan, 200_001, "61", "per_authorization_amount_limit")
        sent.swipe(pan, 200_000, "00", "approved")
        sent.swipe(pan, 500, "57", "mcc_category_blocked:adult", **{"18": "5967"})
        sent.swipe(pan, 500, "57", "mcc_category_blocked:gambling", **{"18": "7995"})
        sent.swipe(pan, 500, "57", "country_blocked:KP", **{"43": field43("KP")})
    sent.check_reasons(daemon)


def scenario_reasons() -> set[str]:
    return {reason for scenario in SCENARIOS.values() for reason in scenario.reasons}


def test_simulator_control_scenarios_pass_with_their_reasons(daemon: RunningDaemon) -> None:
    runs = 2  # the scenarios leave the demo data as they found it: a second run passes too
    for _ in range(runs):
        result = run_cli("sim", "--port", str(daemon.port))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "MISMATCH" not in result.stdout
        assert re.search(r"\b0 failed, 4 skipped$", result.stdout.strip()), result.stdout
        assert "skipped (needs --api)" in result.stdout
    # Every approval the control scenarios made was reversed: nothing is left held.
    daemon.settle()
    ledger = Ledger(daemon.ledger, readonly=True)
    try:
        with ledger.read() as reader:
            controls_account = reader.account("demo-controls")
    finally:
        ledger.close()
    assert controls_account is not None and controls_account.held == 0
    counted = metric_reasons(daemon)
    without_api = {
        reason
        for scenario in SCENARIOS.values()
        if not scenario.needs_api
        for reason in scenario.reasons
    }
    missing = sorted(reason for reason in without_api if counted[reason_family(reason)] < runs)
    assert not any(":" in reason for reason in counted), counted
    assert not missing, (missing, counted)


def test_simulator_api_scenario_freeze_then_swipe(tmp_path: Path) -> None:
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, PROCESSOR_API_TOKEN=API_TOKEN)
    daemon = RunningDaemon(tmp_path / "ledger", env=env)
    try:
        daemon.start()
        api = f"http://127.0.0.1:{daemon.http_port}"
        for _ in range(2):  # each run registers a card of its own: the second passes too
            result = run_cli("sim", "--port", str(daemon.port), "--api", api, env=env)
            assert result.returncode == 0, result.stdout + result.stderr + daemon.stderr()
            assert re.search(r"\b0 failed, 0 skipped$", result.stdout.strip()), result.stdout
        counted = metric_reasons(daemon)
        missing = sorted(
            reason for reason in scenario_reasons() if counted[reason_family(reason)] < 2
        )
        assert not missing, (missing, counted)
        # A refused API call is a failure of the scenario, and of the run.
        wrong = dict(env, PROCESSOR_API_TOKEN="not-" + API_TOKEN)
        failed = run_cli(
            "sim", "--port", str(daemon.port), "--api", api, "freeze_then_swipe", env=wrong
        )
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "MISMATCH" in failed.stdout and "401" in failed.stdout
        # Without the token the simulator refuses to start rather than fail every API call.
        no_token = {k: v for k, v in env.items() if k != "PROCESSOR_API_TOKEN"}
        refused = run_cli("sim", "--port", str(daemon.port), "--api", api, env=no_token)
        assert refused.returncode == 2
        assert "PROCESSOR_API_TOKEN" in refused.stderr
    finally:
        daemon.stop()
