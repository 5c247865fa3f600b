"""The experiment: the config checked and assembled into agent specs, data and a method plan.

Modules: assembly (Settings, Experiment, build_experiment, check_config), methods, mixing,
convergence (the still-rising rule). Nothing here runs a round (docs/design.md#layers).
"""
