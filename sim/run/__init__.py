"""The run: the `mhd-sim` CLI, preflight checks, the run (main) and its round loop, the exchange
of predictions through a backend, checkpoints and interrupts (docs/design.md#layers).
"""
