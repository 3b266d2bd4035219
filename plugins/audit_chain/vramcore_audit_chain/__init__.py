"""Tamper-evident, crash-safe, forward-secure HMAC-chained audit log for vramcore, with an offline verifier."""
