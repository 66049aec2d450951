"""Webhooks layer: reads the outbox, signs, delivers with retries, keeps dead letters.

Never on the authorisation path: it runs as its own tasks, reads the ledger only in read
transactions and keeps its own state in a separate LMDB environment.
"""
