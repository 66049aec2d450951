"""The command line's answers to bad input: one line, an exit code, no traceback, no clear PAN."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from processor.cli import main
from processor.sim.load import LoadSpec, run_load

PAN = "4761739001010010"


def answer(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse's usage errors
        code = int(exit.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    "argv",
    [
        ("webhooks", "listen", "--port", "99999", "--secret-env", "HOOK"),
        ("sim", "--port", "99999", "echo"),
        ("sim", "--port", "-1", "echo"),
        ("sim", "load", "--port", "70000", "--rate", "1", "--duration", "1"),
    ],
)
def test_a_port_out_of_range_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    # It was an OverflowError traceback from bind() or connect().
    code, said = answer(capsys, *argv)
    assert code == 2 and "is outside 0..65535" in said and "Traceback" not in said


@pytest.mark.parametrize(
    "argv",
    [
        ("sim", "load", "--pan", PAN, "--rate", "1", "--duration", "1"),
        ("ledger", "show", f"--pa={PAN}"),
    ],
)
def test_a_card_number_in_a_usage_error_is_masked(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    code, said = answer(capsys, *argv)
    assert code == 2 and PAN not in said and "476173******0010" in said


def test_a_card_number_given_as_the_variables_name_is_masked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --pan-e=<PAN> abbreviates --pan-env: the "variable" was then printed in clear.
    from processor.ledger.store import Ledger

    Ledger(tmp_path / "l", durability="process", map_size_bytes=1 << 22).close()
    monkeypatch.setenv("PROCESSOR_PAN_KEY", "k" * 32)
    ledger = str(tmp_path / "l")
    code, said = answer(capsys, "ledger", "show", "--ledger", ledger, f"--pan-e={PAN}")
    assert code == 2 and "does not hold a PAN" in said and PAN not in said


def test_what_the_machine_refuses_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host that does not resolve was a socket.gaierror traceback.
    monkeypatch.setenv("HOOK", "whsec_" + "A" * 40)
    code, said = answer(
        capsys,
        "webhooks",
        "listen",
        "--host",
        "no.such.invalid",
        "--port",
        "0",
        "--secret-env",
        "HOOK",
    )
    assert code == 1 and said.startswith("processor: ") and "Traceback" not in said


def test_an_unwritable_json_report_is_refused_before_the_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # It was found after the whole run, as a FileNotFoundError traceback.
    spec = LoadSpec("127.0.0.1", 1, rate=1, duration=60.0, connections=1, json_out=str(tmp_path))
    assert run_load(spec) == 2
    assert f"--json {tmp_path}" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


def test_ctrl_c_ends_a_command_with_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import processor.cli as cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_sim", interrupted)
    code, said = answer(capsys, "sim", "echo")
    assert code == 130 and "Traceback" not in said


def test_a_card_number_in_a_config_error_is_masked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The "(got ...)" part was masked, msgspec's own "Invalid enum value '...'" was not.
    config = tmp_path / "bad.toml"
    config.write_text(f'[ledger]\ndurability = "{PAN}"\n')
    code, said = answer(capsys, "ledger", "show", "--config", str(config), "--account", "a")
    assert code == 2 and "$.ledger.durability" in said
    assert PAN not in said and "476173******0010" in said
