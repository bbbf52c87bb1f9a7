"""Example third-party RESP plugin (see docs/plugins.md)."""
