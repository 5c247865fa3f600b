"""The experiment: the config checked and assembled into agent specs, data and a method plan.

Modules, in the order a run uses them: settings (check_config -> Settings: every check that
needs no data), params (a config group as builder kwargs), optimizer (train group, optimizer
build check), backbones (per-agent backbone, optimizer overrides, model configs), methods
(MethodPlan), mixing (weight-averaging rows), convergence (the still-rising rule), assembly
(build_experiment -> Experiment: Settings plus what the data made of them). Nothing here
runs a round (docs/design.md#layers).
"""
