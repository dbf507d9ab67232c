"""Pluggable authentication factors: a verifier for the gateway, a prover for `gw`."""
