"""The upstream MTA: relay in lock-step with the client, smarthosts or MX delivery."""
