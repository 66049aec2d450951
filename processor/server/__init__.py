"""Server layer: links, batching, group commit, write-back, shutdown. No business rules."""
