"""Where metrics go: the run directory's metrics.jsonl and rounds.jsonl always (network.jsonl for a
dynamic network, docs/dynamic.md), plus the sinks of `logger`.

A sink sees the run start, every round, every evaluation and the summary; `close` is always
called (in a finally), so a wandb run is finished even when the simulation fails.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf
from tqdm import tqdm

from sim.core.atomic import write_then_rename
from sim.core.registry import Registry
from sim.reporting.rundir import read_graph, read_partition

if TYPE_CHECKING:  # matplotlib (~1 s to import) only where a figure is drawn: wandb, the report
    from matplotlib.figure import Figure


class Sink:
    """No-op base: subclasses override what they care about."""

    def start(self, config: dict[str, Any], total_rounds: int) -> None: ...

    def log_round(self, round_idx: int, record: dict[str, float]) -> None: ...

    def log_eval(self, round_idx: int, record: dict[str, Any]) -> None: ...

    def log_network(self, round_idx: int, record: dict[str, Any]) -> None:
        """A dynamic network's round (sim/run/loop.py:network_record): active agents and messages."""

    def finish(self, summary: dict[str, Any]) -> None: ...

    def rewind(self, next_round: int) -> None:
        """Forget what was logged after `next_round` rounds (a rollback or a resume)."""

    def close(self) -> None: ...


class JsonlFile:
    """An append-only JSON-lines file whose lines carry a "round" (rounds completed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("a")

    def append(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def keep_through(self, last_round: int) -> None:
        """Drop the lines after round `last_round` (their rounds will be run again)."""
        self.file.close()
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["round"] <= last_round]
        with write_then_rename(self.path) as partial:
            partial.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")

    def close(self) -> None:
        self.file.close()


class JsonlSink(Sink):
    """metrics.jsonl (one line per evaluation) and rounds.jsonl (one per round), flushed as written.

    rounds.jsonl holds what every round reports (losses, bytes sent, round time), so that the
    run report can plot them per round even when evaluations are sparse.
    """

    def __init__(self, run_dir: Path) -> None:
        self.evaluations = JsonlFile(run_dir / "metrics.jsonl")
        self.rounds = JsonlFile(run_dir / "rounds.jsonl")
        self.network_path = run_dir / "network.jsonl"
        # network.jsonl only for a dynamic network; open it now if a resumed run has one
        self.network: JsonlFile | None = JsonlFile(self.network_path) if self.network_path.exists() else None

    def log_round(self, round_idx: int, record: dict[str, float]) -> None:
        self.rounds.append({**record, "round": round_idx + 1})  # rounds completed, as in metrics.jsonl

    def log_eval(self, round_idx: int, record: dict[str, Any]) -> None:
        self.evaluations.append(record)

    def log_network(self, round_idx: int, record: dict[str, Any]) -> None:
        if self.network is None:
            self.network = JsonlFile(self.network_path)
        self.network.append(record)

    def rewind(self, next_round: int) -> None:
        self.evaluations.keep_through(next_round)
        self.rounds.keep_through(next_round)
        if self.network is not None:
            self.network.keep_through(next_round)

    def close(self) -> None:
        self.evaluations.close()
        self.rounds.close()
        if self.network is not None:
            self.network.close()


class ConsoleSink(Sink):
    """A progress bar over rounds, and the per-head accuracy table at the end."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.bar: tqdm | None = None

    def start(self, config: dict[str, Any], total_rounds: int) -> None:
        self.bar = tqdm(total=total_rounds, desc="rounds", unit="round", disable=not self.progress, file=sys.stderr)

    def log_round(self, round_idx: int, record: dict[str, float]) -> None:
        self.rewind(round_idx + 1)

    def rewind(self, next_round: int) -> None:
        if self.bar is not None:
            self.bar.n = next_round
            self.bar.refresh()

    def log_eval(self, round_idx: int, record: dict[str, Any]) -> None:
        if self.bar is not None:
            main = record["heads"]["main"]
            self.bar.set_postfix(shared=f"{main['shared_acc']:.3f}", private=f"{main['private_acc']:.3f}")

    def finish(self, summary: dict[str, Any]) -> None:
        self.close()
        print(format_head_table(summary), flush=True)
        if "convergence" in summary:
            print(f"convergence: {summary['convergence']['note']}", flush=True)
        if "privacy" in summary:
            print(privacy_line(summary["privacy"]), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_head_table(summary: dict[str, Any]) -> str:
    """The terminal table: per head, shared and private accuracy as mean / min / max."""
    lines = [
        f"{summary['method']} | {summary['num_agents']} agents | {summary['rounds']} rounds | "
        f"{summary['wall_time_s']:.1f} s | {summary['comm_bytes_total'] / 1e6:.2f} MB sent",
        f"{'head':<6} {'shared acc  mean   min   max':>29} {'private acc  mean   min   max':>31}",
    ]
    for head, row in summary["final"]["heads"].items():
        shared = f"{row['shared_acc']:.3f} {row['shared_acc_min']:.3f} {row['shared_acc_max']:.3f}"
        private = f"{row['private_acc']:.3f} {row['private_acc_min']:.3f} {row['private_acc_max']:.3f}"
        lines.append(f"{head:<6} {shared:>29} {private:>31}")
    return "\n".join(lines)


def privacy_line(privacy: dict[str, Any]) -> str:
    """The final console line of a private run: epsilon over agents, and who stopped (docs/privacy.md)."""
    if privacy["mechanism"] != "dp_sgd":  # an output mechanism: local DP of the messages
        epsilons = [value for value in (privacy["epsilon"] or {}).values() if value is not None]
        spent = f"{max(epsilons):.3g}" if epsilons else "0"
        return (
            f"privacy: {privacy['mechanism']}, epsilon {privacy['epsilon_per_release']:g} per release, "
            f"{privacy['epsilon_per_message']:.3g} per message, {spent} over every message at "
            f"delta={privacy['delta']:g} (local DP of the messages)"
        )
    epsilons = [value for value in (privacy["epsilon"] or {}).values() if value is not None]
    spent = f"epsilon {min(epsilons):.2f}-{max(epsilons):.2f}" if epsilons else "no epsilon (not accounted)"
    stopped = privacy["stopped_sharing"]
    ended = f"; stopped sharing: agents {', '.join(map(str, stopped))}" if stopped else ""
    if privacy["rounds"] < privacy["planned_rounds"]:
        ended += f"; run stopped after {privacy['rounds']} of {privacy['planned_rounds']} rounds"
    return f"privacy: dp_sgd, {spent} at delta={privacy['delta']:g}{ended}"


PER_AGENT_COLUMNS = ("round", "agent", "head", "shared_acc", "private_acc")  # the wandb.Table per evaluation


WANDB_RECORD = "wandb.json"  # in the run directory: the wandb run to continue, and the last round it holds


class WandbSink(Sink):
    """One wandb run per simulation (online, offline for `wandb sync` later, or disabled).

    Runs of one sweep share a group (the sweep directory, or `logger.group`) and are named by
    their overrides; the job type is the method, so the UI can split MHD from baselines. Every
    chart is plotted against `round`. Images come from sim/reporting/plots, the same figures as
    report.html.

    A run keeps one wandb run for its whole life: RUN_DIR/wandb.json records the run's id, name
    and group and the last round logged, so `resume=RUN_DIR` continues the same wandb run
    (wandb's resume="allow"; offline, `wandb sync` joins the pieces by id). Rounds replayed
    after a rollback or a resume from an older checkpoint are not logged again: the replay
    reproduces them bit for bit, and wandb cannot take a row back.
    """

    def __init__(self, params: dict[str, Any], run_dir: Path) -> None:
        self.params = params
        self.run_dir = run_dir
        self.run: Any = None
        self.pending: dict[str, Any] = {}  # this round's record, until its evaluation (if any) joins it
        self.completed = False
        self.record: dict[str, Any] = {}  # what wandb.json holds: id, name, group, logged_through

    def start(self, config: dict[str, Any], total_rounds: int) -> None:
        import wandb  # imported here: runs without logger=wandb never pay for it

        from sim.reporting import plots

        saved = self.run_dir / WANDB_RECORD
        sweep_group, job_name = hydra_job_names()
        self.record = json.loads(saved.read_text()) if saved.is_file() else {"logged_through": -1}
        self.run = wandb.init(
            project=self.params["project"],
            entity=self.params["entity"],
            group=self.record.get("group", self.params["group"] or sweep_group),
            name=self.record.get("name", self.params["run_name"] or job_name),
            tags=list(self.params["tags"]),
            mode=self.params["mode"],
            job_type=config["method"]["name"],
            dir=str(self.run_dir),
            config=config,
            id=self.record.get("id"),
            resume="allow" if "id" in self.record else None,
        )
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")
        self.record |= {"id": self.run.id, "name": self.run.name, "group": self.run.group}
        if self.record["logged_through"] >= 0:  # a resumed run: its set-up is logged already
            return
        class_counts = read_partition(self.run_dir / "partition.csv")
        graph = read_graph(self.run_dir / "graph.edgelist", len(class_counts))
        self.run.log(
            {
                "round": 0,
                "setup/graph": _image(plots.communication_graph(graph)),
                "setup/partition": _image(plots.partition_heatmap(class_counts)),
            }
        )
        self._logged(0)

    def log_round(self, round_idx: int, record: dict[str, float]) -> None:
        self._flush()
        self.pending = {**record, "round": round_idx + 1}  # rounds completed, as in metrics.jsonl

    def log_eval(self, round_idx: int, record: dict[str, Any]) -> None:
        import wandb

        self.pending["eval/test_samples"] = record["test_samples"]  # a subset's during training, all at the end
        for head, row in record["heads"].items():
            for metric in ("shared_acc", "private_acc"):
                self.pending[f"{metric}/{head}"] = row[metric]
                self.pending[f"{metric}/{head}_min"] = row[f"{metric}_min"]
                self.pending[f"{metric}/{head}_max"] = row[f"{metric}_max"]
        rows = [
            [record["round"], int(agent), head, accuracy["shared_acc"], accuracy["private_acc"]]
            for agent, heads in record["per_agent"].items()
            for head, accuracy in heads.items()
        ]
        self.pending["per_agent"] = wandb.Table(columns=list(PER_AGENT_COLUMNS), data=rows)
        self._flush()

    def rewind(self, next_round: int) -> None:
        self._flush()  # what is logged stays logged: wandb cannot un-log

    def finish(self, summary: dict[str, Any]) -> None:
        from sim.reporting import plots

        self._flush()
        final = summary["final"]
        per_agent = {int(agent): heads for agent, heads in final["per_agent"].items()}
        graph = read_graph(self.run_dir / "graph.edgelist", summary["num_agents"])
        main_shared = {agent: heads["main"]["shared_acc"] for agent, heads in per_agent.items()}
        self.run.log(
            {
                "round": final["round"],
                "final/graph": _image(plots.communication_graph(graph, main_shared)),
                "final/private_vs_shared": _image(plots.private_vs_shared(per_agent)),
            }
        )
        self.run.summary.update(flatten({key: value for key, value in summary.items() if key != "final"}))
        self.run.summary.update(flatten({"final": {key: final[key] for key in ("round", "test_samples", "heads")}}))
        self.completed = True

    def close(self) -> None:
        if self.run is not None:
            try:
                self._flush()
            finally:
                self.run.finish(exit_code=0 if self.completed else 1)  # a failed run shows as failed
                self.run = None

    def _flush(self) -> None:
        """Log the pending round, unless a replay brought it back: wandb holds it already."""
        if self.pending and self.pending["round"] > self.record["logged_through"]:
            self.run.log(self.pending)
            self._logged(self.pending["round"])
        self.pending = {}

    def _logged(self, round_done: int) -> None:
        """Note that wandb holds every round up to `round_done` (not in disabled mode: there is no run to continue)."""
        self.record["logged_through"] = round_done
        if self.params["mode"] != "disabled":
            with write_then_rename(self.run_dir / WANDB_RECORD) as partial:
                partial.write_text(json.dumps(self.record) + "\n")


def hydra_job_names() -> tuple[str | None, str | None]:
    """(group, run name) from the Hydra job, if any: a sweep's directory and what this job varies.

    Outside a sweep there is no group and the name is the command line's overrides.
    """
    if not HydraConfig.initialized():
        return None, None
    hydra = HydraConfig.get()
    all_overrides = str(hydra.job.override_dirname) or None
    if hydra.mode != RunMode.MULTIRUN:
        return None, all_overrides
    sweep_dir = Path(str(hydra.sweep.dir))
    return str(sweep_dir), swept_overrides(sweep_dir, [str(o) for o in hydra.overrides.task]) or all_overrides


def swept_overrides(sweep_dir: Path, job_overrides: list[str]) -> str:
    """This job's overrides of the keys its sweep varies (`method=isolated,seed=1`), or "".

    The sweep's own overrides (`method=mhd,isolated seed=0,1`) are in the multirun.yaml that
    Hydra's basic sweeper writes before the first job; other sweepers may not write it.
    """
    saved = sweep_dir / "multirun.yaml"
    if not saved.is_file():
        return ""
    parser = OverridesParser.create()
    sweep = parser.parse_overrides([str(o) for o in OmegaConf.load(saved).hydra.overrides.task])
    swept = {override.get_key_element() for override in sweep if override.is_sweep_override()}
    parsed = parser.parse_overrides(job_overrides)
    return ",".join(
        text for text, override in zip(job_overrides, parsed, strict=True) if override.get_key_element() in swept
    )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of `a/b/c` keys (how wandb groups summary values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _image(figure: Figure) -> Any:
    import wandb

    from sim.reporting import plots

    return wandb.Image(plots.pixels(figure))


SinkBuilder = Callable[[dict[str, Any], Path], list[Sink]]
LOGGERS: Registry[SinkBuilder] = Registry("logger")


@LOGGERS.register("console")
def console(params: dict[str, Any], run_dir: Path) -> list[Sink]:
    return [ConsoleSink(params["progress"])]


@LOGGERS.register("wandb")
def wandb_and_console(params: dict[str, Any], run_dir: Path) -> list[Sink]:
    return [ConsoleSink(params["progress"]), WandbSink(params, run_dir)]
