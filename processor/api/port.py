"""What the HTTP side needs from the running processor: a narrow interface, not the daemon.

The server and the HTTP side are siblings (DESIGN.md, layers): neither imports the other. The
composition root hands the HTTP app something with these members (the Daemon has them), so the
control API can read the ledger and queue its changes into the next group commit, and health
and metrics can be answered, without this package knowing how links or batches work.
"""

from __future__ import annotations

from typing import Protocol

from processor.authorizer import Command
from processor.config import Config
from processor.cvc2 import CardVerificationKeys
from processor.ledger.store import Ledger
from processor.metrics import Metrics
from processor.pan_vault import PanVault
from processor.personal_data import PersonalDataCipher
from processor.security import PanHasher


class Processor(Protocol):
    config: Config
    ledger: Ledger
    metrics: Metrics
    hasher: PanHasher  # the key the ledger is bound to
    card_keys: CardVerificationKeys  # computes the CVC2 of the cards the API issues
    personal_data: PersonalDataCipher | None  # seals and opens cardholders' personal data
    pan_vault: PanVault | None  # keeps issued cards' PANs for the one-time reveal
    stopping: bool
    ledger_full: bool  # the last batch found the map full at its ceiling
    ledger_failing: str | None  # the last batch's ledger error (answered 96), if it had one

    def map_used_ratio(self) -> float:
        """The share of the ledger map's ceiling in use."""

    @property
    def pending(self) -> int:
        """Requests waiting for the next batch."""

    @property
    def link_count(self) -> int:
        """Open ISO 8583 links."""

    async def execute(self, command: Command) -> object:
        """Run `command` in the next batch's write transaction; its result once durable."""
