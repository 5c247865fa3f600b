"""Reporting: metrics of a round, sinks (JSONL, console, wandb), plots, run directories, the
per-run report and the sweep comparison table (`mhd-sim-report`) (docs/design.md#layers).
"""
