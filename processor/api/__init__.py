"""HTTP side port: /metrics, /healthz (and, later, the control API)."""
