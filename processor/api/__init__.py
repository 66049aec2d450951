"""HTTP side port: the control API (/v1), /metrics, /healthz, /readyz."""
