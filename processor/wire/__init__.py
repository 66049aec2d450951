"""Wire layer: framing, the ISO 8583 spec, decode into typed requests, encode responses.

Sans-I/O: nothing here reads a socket or the ledger; it turns bytes into Structs and back.
"""
