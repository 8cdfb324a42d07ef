"""Everything the admin configures, read once into typed settings: gateway.toml, GATEWAY_* overrides, key and secret files."""
