"""Foundations shared by every layer: error type, name registries, seed derivation, value checks,
config nodes as plain Python, write-then-rename.

Imports nothing else of the project (only the standard library, numpy, omegaconf), so `agents/`
and `topologies/` use it without loading any driver code (docs/design.md#layers).
"""
