"""Backends that ship with the core distribution (those needing no third-party SDK)."""
