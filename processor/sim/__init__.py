"""Network simulator: scenarios and an open-loop load generator. Speaks only the wire."""
