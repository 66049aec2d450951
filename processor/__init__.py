"""Issuer-side ISO 8583 authorisation processor on an LMDB ledger."""

__version__ = "0.1.0"
