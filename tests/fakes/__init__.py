"""Loopback fakes of sandbox providers, driven by the providers' real SDKs in tests."""
