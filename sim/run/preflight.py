"""Checks a `mhd-sim` command line before Hydra runs it, so that bad input is one line and exit 2.

Hydra reports a bad override (an unknown option of a config group, a key that does not
exist, a syntax error) in several lines with exit code 1, and a bad value would otherwise be
found only once a job has started. `preflight` composes the packaged config with the same
overrides as Hydra's main will, hydra.* ones included, so whatever main would reject fails
here first, as a ConfigError that names the override. It also rejects what would compose but
break later (a removed key, a value in place of a group of keys, an unresolvable ${...}),
checks that the output folder can be created, and runs the checks that need no data
(`sim.run.main` names, `sim.experiment.settings.check_config`).

Sweeps (--multirun) are checked one combination at a time, the same jobs that Hydra's basic
sweeper launches. Hydra composes every job of a sweep before it launches the first, and a
compose takes about 0.1 s against minutes of training per job, so checking the full product
is affordable. Checks that need the data (dataset files, sizes against the data) run at the
start of each job, before its actors start.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from hydra import compose, initialize_config_module
from hydra._internal.utils import get_args_parser
from hydra.core.config_loader import ConfigLoader
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from sim.core.config import plain_dict
from sim.core.errors import ConfigError

CONFIG_MODULE = "conf"  # the packaged config tree, as sim/run/cli.py hands it to hydra.main
CONFIG_NAME = "config"
HYDRA_VERSION_BASE = "1.3"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The packaged config with `overrides` applied, composed as `mhd-sim` composes it (no checks).

    The one way scripts and tests build a config without the CLI.
    """
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=HYDRA_VERSION_BASE):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


COMMANDS = ("--run", "--multirun", "--cfg", "--info", "--shell-completion")  # Hydra takes one at most


class Jobs(NamedTuple):
    """The composed config of every job a command line runs, and whether their values are to be judged."""

    configs: list[DictConfig]
    judged: bool  # False for --cfg and --info, which only print a config


def preflight(args: Sequence[str]) -> list[DictConfig]:
    """Checks the command line `args` (sys.argv[1:]) and returns the composed config of every job.

    Help, a version, shell completion, a rerun, and another config tree (--config-path,
    --config-dir, --config-name) have nothing of ours to check, so they return [].
    --cfg and --info only print a config: their overrides must compose, but values are not judged.

    Raises:
        ConfigError: for the first bad flag, override or value, naming it.
    """
    jobs = compose_jobs(args)
    check_jobs(jobs)
    return jobs.configs


def compose_jobs(args: Sequence[str]) -> Jobs:
    """The first half of `preflight`: flags, override syntax, composition, shape, output folder.

    Imports neither torch nor the agents, so `mhd-sim` can start Ray right after it and load
    torch for `check_jobs` while Ray's processes come up.
    """
    command = _parse_command(args)
    if _nothing_to_check(command):
        return Jobs([], judged=False)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=HYDRA_VERSION_BASE):
        composer = _Composer(GlobalHydra.instance().config_loader())
        overrides = composer.parse(command.overrides)
        configs = [composer.job(job) for job in _jobs(overrides, command.multirun)]
    judged = command.cfg is None and command.info is None
    if judged:
        _check_output_folder(configs[0], "hydra.sweep.dir" if command.multirun else "hydra.run.dir")
    return Jobs(configs, judged)


def check_jobs(jobs: Jobs) -> None:
    """The second half of `preflight`: every value of every job, with the checks that need no data."""
    if not jobs.judged:
        return
    from sim.experiment.settings import check_config  # imports torch and the agents
    from sim.run.main import check_names

    for cfg in jobs.configs:
        check_names(cfg)
        check_config(cfg)


def debug_requested(args: Sequence[str]) -> bool:
    """Whether `args` set debug=true. Read from the raw text: a bad command line may not compose."""
    return any(arg.lstrip("+").lower() == "debug=true" for arg in args)


def _parse_command(args: Sequence[str]) -> argparse.Namespace:
    """Hydra's own flag parser, with each of its errors (an unknown flag too) as a ConfigError."""
    parser = get_args_parser()

    def fail(message: str) -> NoReturn:
        raise ConfigError("flags", " ".join(arg for arg in args if arg.startswith("-")), message)

    parser.error = fail  # type: ignore[method-assign]  # argparse would print its usage and exit
    command, unknown = parser.parse_known_args(list(args))
    if unknown and unknown[0].startswith("-"):
        fail(f"{unknown[0]} is not a flag of mhd-sim (see mhd-sim --help)")
    if unknown:
        fail(f"{unknown[0]} follows a flag that follows other overrides; put all overrides after the flags")
    given = [bool(command.run), bool(command.multirun), command.cfg is not None, command.info is not None]
    if sum([*given, bool(command.shell_completion)]) > 1:
        fail(f"give only one of {', '.join(COMMANDS)}")
    return command


def _nothing_to_check(command: argparse.Namespace) -> bool:
    """Hydra only prints help or completions, reruns a saved job, or reads a config tree not ours."""
    others = (command.help, command.hydra_help, command.shell_completion, command.experimental_rerun)
    other_tree = (command.config_path, command.config_dir, command.config_name)
    return any(others) or any(option is not None for option in other_tree)


def _jobs(overrides: list[Override], multirun: bool) -> list[list[str]]:
    """The override lists of the jobs Hydra will run: one, or the sweep's full product.

    Like Hydra's basic sweeper, a sweep keeps the last override of each key.
    """
    for override in overrides:
        if override.is_delete() and not override.is_hydra_override():
            raise ConfigError(override.key_or_group, _line(override), "kept (every key is read): set a value")
        if override.is_sweep_override() and not multirun:
            raise ConfigError(
                override.key_or_group,
                _value_text(override),
                "one value; to sweep add --multirun, for a list write [a,b], for a string quote it",
            )
    if not multirun:
        return [[_line(override) for override in overrides]]
    swept = {override.get_key_element(): _sweep(override) for override in overrides}
    return [list(job) for job in itertools.product(*swept.values())]


def _sweep(override: Override) -> list[str]:
    """One `key=value` per value of a swept override (a list, range() or choice())."""
    if not override.is_sweep_override():
        return [_line(override)]
    if not override.is_discrete_sweep():
        raise ConfigError(
            override.key_or_group,
            _value_text(override),
            "a list a,b, range() or choice(): the basic sweeper cannot sample an interval()",
        )
    key = override.get_key_element()
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


class _Composer:
    """Composes jobs as Hydra's main will, and explains each failure as a ConfigError."""

    def __init__(self, loader: ConfigLoader) -> None:
        self.loader = loader
        self.parser = OverridesParser.create(config_loader=loader)
        self.references: dict[tuple[str, ...], DictConfig] = {}

    def parse(self, texts: Sequence[str]) -> list[Override]:
        try:
            return self.parser.parse_overrides(list(texts))
        except OverrideParseException:
            for text in texts:
                self._parse_one(text)
            raise

    def _parse_one(self, text: str) -> None:
        try:
            self.parser.parse_overrides([text])
        except OverrideParseException as error:
            key, equals, value = text.partition("=")
            key, value = (key.lstrip("+~"), value) if equals else ("override", text)
            raise ConfigError(key, value, f"not an override Hydra can parse ({_one_line(error)})") from error

    def job(self, texts: list[str]) -> DictConfig:
        """The composed config of one job (with its hydra node), checked to resolve and keep its shape."""
        overrides = self.parse(texts)
        try:
            cfg = _compose(texts)
        except MissingConfigException as error:
            raise self._unknown_option(error) from error
        except Exception as error:  # Hydra raises its own errors, OmegaConf's, ValueError, ...
            raise self._blame(overrides, error) from error
        _check_resolves(cfg)
        ours, reference = (plain_dict(c, resolve=False, drop=("hydra",)) for c in (cfg, self._reference(overrides)))
        _check_shape(ours, reference, "")
        return cfg

    def _is_group(self, override: Override) -> bool:
        return bool(self.loader.get_group_options(override.key_or_group))

    def _reference(self, overrides: list[Override]) -> DictConfig:
        """The config with the job's group choices but none of its values: the shape to keep."""
        groups = tuple(_line(override) for override in overrides if self._is_group(override))
        if groups not in self.references:
            self.references[groups] = _compose(list(groups))
        return self.references[groups]

    def _unknown_option(self, error: MissingConfigException) -> ConfigError:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        options = self.loader.get_group_options(group)
        return ConfigError(group, option, f"known options are {', '.join(options)}")

    def _blame(self, overrides: list[Override], error: Exception) -> ConfigError:
        """Finds the override that breaks composition: groups first, then values, as Hydra applies them."""
        ordered = sorted(overrides, key=lambda override: not self._is_group(override))
        last_good = _compose([])
        for count, override in enumerate(ordered, start=1):
            try:
                last_good = _compose([_line(o) for o in ordered[:count]])
            except Exception as failure:  # whatever Hydra raises, this override caused it
                return _explain(override, failure, last_good)
        return ConfigError("overrides", " ".join(_line(o) for o in overrides), _one_line(error))


def _explain(override: Override, failure: Exception, before: DictConfig) -> ConfigError:
    """The ConfigError for `override`; `before` is the config composed just without it."""
    key = override.key_or_group
    value = override.value()  # a job's overrides hold single values: sweeps are expanded by now
    if isinstance(failure.__cause__, (ConfigAttributeError, ConfigKeyError)):
        parent, _, _ = key.rpartition(".")
        siblings = OmegaConf.select(before, parent) if parent else before
        known = ", ".join(str(name) for name in siblings if name != "hydra") if isinstance(siblings, DictConfig) else ""
        where = f"{parent} has" if parent else "top-level keys are"
        return ConfigError(key, value, f"no such key ({where} {known}; use +{key}=... to add one)")
    return ConfigError(key, value, _one_line(failure))


def _compose(overrides: list[str]) -> DictConfig:
    return compose(config_name=CONFIG_NAME, overrides=overrides, return_hydra_config=True)


def _check_resolves(cfg: DictConfig) -> None:
    """Every interpolation (${...}) resolves now, not halfway through a run (hydra's own are Hydra's)."""
    ours = OmegaConf.masked_copy(cfg, [str(key) for key in cfg if key != "hydra"])
    try:
        OmegaConf.to_container(ours, resolve=True)
    except OmegaConfBaseException as error:
        raw = None if error.child_node is None else str(error.child_node)
        reason = str(error.msg).splitlines()[0]
        raise ConfigError(str(error.full_key), raw, f"cannot be resolved: {reason}") from error


def _check_shape(composed: Any, reference: Any, key: str) -> None:
    """Overrides change values: none may put a value where the packaged tree has a group of keys or a list."""
    if isinstance(reference, dict):
        if not isinstance(composed, dict):
            keys = ", ".join(reference)
            raise ConfigError(key, composed, f"a group of keys ({keys}); set them one by one, e.g. {key}.KEY=VALUE")
        for name, expected in reference.items():
            _check_shape(composed.get(name), expected, f"{key}.{name}" if key else name)
    elif isinstance(reference, list) and not isinstance(composed, list):
        raise ConfigError(key, composed, f"a list, e.g. {key}={reference}")


def _check_output_folder(cfg: DictConfig, key: str) -> None:
    """Hydra creates the run folder before any code of ours runs, and fails there with a traceback."""
    folder = Path(str(OmegaConf.select(cfg, key))).absolute()
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(key, str(folder), f"a folder mhd-sim can create; {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, str(folder), f"a folder mhd-sim can create; {existing} is not writable")


def _line(override: Override) -> str:
    """The override as typed (Hydra leaves it None only for overrides built in code)."""
    return str(override.input_line)


def _value_text(override: Override) -> str:
    """The value as typed, e.g. `1,2` (Hydra cannot turn a sweep back into a string)."""
    return _line(override).partition("=")[2]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
