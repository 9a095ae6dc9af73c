"""Outbound webhooks: signing and sending account lifecycle events."""
