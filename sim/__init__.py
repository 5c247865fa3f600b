"""mhd-sim driver: CLI, experiment assembly, round loop, routing, metrics and logging.

Importing this package is cheap (no torch, no Ray): `agents` and `topologies` use its
registry and error types.
"""
