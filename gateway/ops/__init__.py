"""What operators read: structured logs, Prometheus metrics, the admin HTTP port. Knows nothing of SMTP."""
