"""Ledger layer: LMDB environment, records, holds, balances and stored answers.

Knows nothing of ISO 8583: it stores Structs under keys the layers above compute.
"""
