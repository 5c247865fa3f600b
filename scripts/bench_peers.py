"""The same FedAvg workload through Flower, a raw PyTorch loop and mhd-sim: whole-process wall time and PSS.

    python scripts/bench_peers.py [--ks 8,32,200] [--systems flower,raw,mhd_fedavg,mhd_mhd] [--repeats 2]
                                  [--flower-python /work/venv-flwr/bin/python] [--wait-load 1.5]
                                  [--out bench_peers.json]

Every system runs as its own process, one at a time, started from this script; the systems are
interleaved (A B C D A B C D ...) and each number is the median over --repeats:

    flower      Flower's simulation engine (flwr.simulation.run_simulation, ServerApp + ClientApp, the
                FedAvg strategy, the Ray backend with one CPU per client: two client actors on 2 cores).
                flwr[simulation] pins its own Ray, so it usually lives in another virtualenv: pass that
                venv's Python as --flower-python. Without flwr there, Flower is reported "not installed".
    raw         a plain PyTorch loop in one process, no framework, --raw-threads torch threads (1): the floor
    mhd_fedavg  `mhd-sim method=fedavg`: the console script's entry point run by this Python, from the
                checkout as installed or, with --mhd-sim-rev REV, from `git archive REV` (one known commit
                while others edit the checkout)
    mhd_mhd     `mhd-sim method=mhd`: prediction sharing on a ring instead of weight averaging

The workload (per --ks entry; the K=8/32 and K=200 settings are in SETTINGS):
    K clients, each with `samples_per_client` private samples of generated class-conditional
    Gaussian images (1x8x8, 10 classes: mhd-sim's `data=synthetic` sizes), an i.i.d. split;
    R rounds; per round and client: E SGD steps (lr 0.05, momentum 0.9, weight decay 5e-4) on
    batches of B private samples, then one logits pass on the round's public batch (128 of 1,000
    public samples; 16 at K = 200), then the server's shard-size-weighted average of the weights;
    after the last round every client evaluates its model on the test set (1,000 images; 200 at
    K = 200): mhd-sim always evaluates every agent after the last round.
    The model is mhd-sim's `small_cnn` with one head (conv3x3 32, conv3x3 64, 2x2 max pools,
    global average pool, Linear 64->128, Linear 128->10: 28,426 parameters) in every system.
Where the systems cannot do exactly that, WORKLOAD_DIFFERENCES (also in the JSON) says how they differ.

Measured per process:
    wall_s      from just before the process is started until it exits: imports, framework
                start-up (Ray), the run, reports and shutdown: what a user waits for
    peak PSS    the highest sum, over the process and everything it started (children, Ray's GCS,
                raylet and workers, found by an environment tag they inherit), of each process's
                proportional set size (/proc/PID/smaps_rollup), sampled every --sample-interval s.
                PSS counts a page shared by N processes 1/N in each, so pages shared inside the tree
                (libraries, Ray's object store) count once, and pages shared with processes outside
                it (another job's torch) only in part.
    other_cpu   CPU seconds the rest of the machine used while it ran: /proc/stat's busy time less
                the run's own (its process tree's CPU times as sampled, Ray's processes included) and
                the sampler's; other_cpu_share is that over wall time x cores: how much other jobs
                competed with it
Ratios: mhd-sim's median over Flower's and over raw's. The targets (issue "speed a user feels"):
mhd-sim's wall time <= 0.8x Flower's at K = 8 and 32, <= 0.33x at K = 200.
Prints a table and writes JSON (--out). Never asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SYSTEMS = ("flower", "raw", "mhd_fedavg", "mhd_mhd")
MHD_SYSTEMS = ("mhd_fedavg", "mhd_mhd")
TAG_VARIABLE = "BENCH_PEERS_TAG"
"""Every measured process gets this variable; whatever it starts inherits it (Ray's daemons and
workers included), so its whole process tree is found even after re-parenting."""

WALL_TARGETS = {8: 0.8, 32: 0.8, 200: 0.33}
"""Largest mhd-sim / Flower whole-process wall-time ratio the issue accepts, per K."""

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to "0" for Flower's process: its local Ray binds to 127.0.0.1, as mhd-sim's does
(sim/backends/ray/backend.py), so all traffic stays on loopback."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark setting; every system runs exactly these sizes."""

    clients: int
    local_steps: int
    batch_size: int
    samples_per_client: int
    rounds: int
    public_size: int = 1000
    public_batch_size: int = 128
    num_test: int = 1000
    image_shape: tuple[int, int, int] = (1, 8, 8)
    num_classes: int = 10
    noise: float = 2.5
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_batch_size: int = 1024
    seed: int = 0

    def to_record(self) -> dict[str, Any]:
        """Flat JSON/ConfigRecord-friendly values (the image shape as a "CxHxW" string)."""
        record = dataclasses.asdict(self)
        record["image_shape"] = "x".join(str(size) for size in self.image_shape)
        return record

    @classmethod
    def from_record(cls, record: Any) -> Workload:
        names = {field.name for field in dataclasses.fields(cls)}
        values = {name: record[name] for name in names}
        shape = values["image_shape"]
        values["image_shape"] = tuple(int(size) for size in (shape.split("x") if isinstance(shape, str) else shape))
        for field in dataclasses.fields(cls):
            if field.type in ("int", int):
                values[field.name] = int(values[field.name])
            elif field.type in ("float", float):
                values[field.name] = float(values[field.name])
        return cls(**values)

    @property
    def train_samples_per_round(self) -> int:
        return self.clients * self.local_steps * min(self.batch_size, self.samples_per_client)


NORMAL = {"local_steps": 20, "batch_size": 32, "samples_per_client": 600, "rounds": 5}
OVERHEAD_BOUND = {
    "local_steps": 1,
    "batch_size": 8,
    "samples_per_client": 40,
    "rounds": 5,
    "public_batch_size": 16,
    "num_test": 200,
}
SETTINGS = {8: NORMAL, 32: NORMAL, 200: OVERHEAD_BOUND}
"""K = 8 and 32: mhd-sim's default local work (20 steps of 32); K = 200: overhead-bound, every batch
tiny (1 step of 8, a public batch of 16, 200 test images), so that per-client costs of the framework
dominate. Any other K uses the normal setting."""

WORKLOAD_DIFFERENCES = [
    "mhd_fedavg does no logits pass on the public batch: mhd-sim's fedavg exchanges weights only "
    "(sim/run/exchange.py publishes predictions for prediction-sharing methods); Flower and raw do the pass "
    "(128 images per client per round, 16 at K = 200)",
    "mhd_mhd shares predictions, not weights: each step trains on B private plus B public samples "
    "(train.distill_batch_size=B, distilling from the ring neighbours' and its own previous logits), the "
    "logits pass runs in every round but the last, no weights are averaged; model.aux_heads=0 keeps the "
    "model at the same 28,426 parameters",
    "Flower's clients are stateless (the ClientApp is called once per message, as Flower intends): each "
    "round builds the model, loads the global weights and starts a fresh SGD optimizer, so momentum "
    "restarts every round and the batch order is drawn per round; mhd-sim and raw keep each client's "
    "model, momentum and shuffled order across rounds. The arithmetic per step is the same",
    "the data are generated with the same sizes and distribution (class prototypes ~ N(0, 1), noise 2.5) "
    "but not the same samples: mhd-sim draws with its own seeded streams (sim/data/builtin.py) and "
    "standardises the pixels, raw and Flower use this script's generator, unstandardised. Time and memory "
    "do not depend on the values; the accuracies are a sanity check only",
    "parallelism: Flower runs two client actors (Ray, client_resources num_cpus=1 on a 2-CPU Ray, torch "
    "threads as Ray sets them: 1), mhd-sim its default two actors with one torch thread each, raw one "
    "process with --raw-threads torch threads (default 1, i.e. one core: with 2 intra-op threads the raw "
    "loop ran up to 20x slower whenever other jobs shared the cores)",
    "mhd-sim also writes what every run writes (run directory, metrics, report.html with plots); "
    "checkpoint_every=0 turns off its checkpoints, which the workload does not include",
    "Flower's aggregation averages in float32 numpy (its FedAvg), mhd-sim accumulates in float64 "
    "(agents/weight_sharing.py), raw in float32 torch",
    "Flower runs through flwr.simulation.run_simulation (deprecated in 1.42 in favour of `flwr run`, "
    "which submits the same app to a detached local SuperLink that outlives the command); "
    "FLWR_TELEMETRY_ENABLED=0 because this machine has no internet",
]


# ---- the shared model and data (raw and Flower; mhd-sim builds its own small_cnn) -------------------


class TinyCNN(nn.Module):
    """mhd-sim's small_cnn (channels [32, 64], embedding 128) with its one-head linear head."""

    def __init__(self, workload: Workload) -> None:
        super().__init__()
        in_channels, height, width = workload.image_shape
        size = min(height, width)
        layers: list[nn.Module] = []
        for out_channels in (32, 64):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            if size >= 4:  # small_cnn's MIN_DOWNSAMPLE_SIZE
                layers.append(nn.MaxPool2d(2))
                size //= 2
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(in_channels, 128)
        self.head = nn.Linear(128, workload.num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))
        return self.head(torch.relu(self.embed(x)))


def build_model(workload: Workload) -> TinyCNN:
    """The common starting point: every system's clients start from one seeded initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(workload.seed)
        return TinyCNN(workload)


def make_optimizer(model: nn.Module, workload: Workload) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=workload.lr, momentum=workload.momentum, weight_decay=workload.weight_decay
    )


@dataclasses.dataclass(frozen=True)
class Data:
    shards: list[tuple[torch.Tensor, torch.Tensor]]  # per client: x [n, C, H, W], y [n]
    public_x: torch.Tensor  # [public_size, C, H, W]
    test_x: torch.Tensor
    test_y: torch.Tensor


def make_data(workload: Workload) -> Data:
    """Class-conditional Gaussians as mhd-sim's synthetic dataset draws them, split i.i.d. into equal shards."""
    rng = np.random.default_rng(workload.seed)
    prototypes = rng.standard_normal((workload.num_classes, *workload.image_shape), dtype=np.float32)

    def sample(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(count) % workload.num_classes).astype(np.int64)
        images = rng.standard_normal((count, *workload.image_shape), dtype=np.float32) * np.float32(workload.noise)
        return images + prototypes[labels], labels

    train_x, train_y = sample(workload.clients * workload.samples_per_client)
    public_x, _ = sample(workload.public_size)  # unlabelled
    test_x, test_y = sample(workload.num_test)
    order = rng.permutation(len(train_y))
    shards = [
        (torch.from_numpy(train_x[part]), torch.from_numpy(train_y[part]))
        for part in np.array_split(order, workload.clients)
    ]
    return Data(shards, torch.from_numpy(public_x), torch.from_numpy(test_x), torch.from_numpy(test_y))


_DATA_CACHE: dict[Workload, Data] = {}
"""Per process (raw; each Flower client actor): the data are generated once and sliced per client."""


def cached_data(workload: Workload) -> Data:
    if workload not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[workload] = make_data(workload)
    return _DATA_CACHE[workload]


def public_batch(data: Data, workload: Workload, round_idx: int) -> torch.Tensor:
    """Round `round_idx`'s public batch: the same samples for every client."""
    rng = np.random.default_rng([workload.seed, 7, round_idx])
    index = rng.choice(workload.public_size, size=min(workload.public_batch_size, workload.public_size), replace=False)
    return data.public_x[torch.from_numpy(index)]


class BatchStream:
    """Minibatch indices over one shard, reshuffled after every pass (epochs)."""

    def __init__(self, size: int, batch_size: int, seed: Sequence[int]) -> None:
        self.generator = torch.Generator().manual_seed(int(np.random.default_rng(list(seed)).integers(2**62)))
        self.size, self.batch_size = size, min(batch_size, size)
        self.order = torch.randperm(size, generator=self.generator)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator)
            self.cursor = 0
        index = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return index


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    shard: tuple[torch.Tensor, torch.Tensor],
    batches: BatchStream,
    steps: int,
) -> float:
    """`steps` SGD steps of cross-entropy on the shard; the mean loss."""
    x, y = shard
    model.train()
    total = 0.0
    for _ in range(steps):
        index = batches.next()
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    return total / steps


def logits_on(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The logits pass on the round's public batch (what a distillation method would send)."""
    model.eval()
    with torch.inference_mode():
        return model(batch)


def accuracy(model: nn.Module, data: Data, workload: Workload) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data.test_y), workload.eval_batch_size):
            x = data.test_x[start : start + workload.eval_batch_size]
            correct += int((model(x).argmax(dim=1) == data.test_y[start : start + workload.eval_batch_size]).sum())
    return correct / len(data.test_y)


def average(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        name: sum(state[name] * (weight / total) for state, weight in zip(states, weights, strict=True))
        for name in states[0]
    }  # type: ignore[misc]


# ---- the raw loop ------------------------------------------------------------------------------------


def run_raw(workload: Workload, threads: int) -> dict[str, Any]:
    """FedAvg in one process: K resident clients (model, momentum, batch order), a dict for the logits."""
    torch.set_num_threads(threads)
    data = make_data(workload)
    initial = build_model(workload).state_dict()
    models = [TinyCNN(workload) for _ in range(workload.clients)]
    for model in models:
        model.load_state_dict(initial)
    optimizers = [make_optimizer(model, workload) for model in models]
    streams = [
        BatchStream(len(shard[1]), workload.batch_size, (workload.seed, client, 0))
        for client, shard in enumerate(data.shards)
    ]
    sizes = [float(len(shard[1])) for shard in data.shards]
    losses: list[float] = []
    for round_idx in range(workload.rounds):
        batch = public_batch(data, workload, round_idx)
        logits: dict[int, torch.Tensor] = {}
        round_losses = []
        for client, model in enumerate(models):
            round_losses.append(
                train_steps(model, optimizers[client], data.shards[client], streams[client], workload.local_steps)
            )
            logits[client] = logits_on(model, batch)
        averaged = average([model.state_dict() for model in models], sizes)
        for model in models:
            model.load_state_dict(averaged)
        losses.append(sum(round_losses) / len(round_losses))
    accuracies = [accuracy(model, data, workload) for model in models]
    return {
        "accuracy": sum(accuracies) / len(accuracies),
        "train_loss": losses,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# ---- Flower -----------------------------------------------------------------------------------------


def _flower_train(msg: Any, context: Any) -> Any:
    """Flower ClientApp train: load the global weights, E steps, the logits pass, reply with the weights."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    config = msg.content["config"]
    workload = Workload.from_record(config)
    data = cached_data(workload)
    client = int(context.node_config["partition-id"])
    round_idx = int(config["server-round"]) - 1
    model = TinyCNN(workload)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = make_optimizer(model, workload)
    shard = data.shards[client]
    batches = BatchStream(len(shard[1]), workload.batch_size, (workload.seed, client, round_idx))
    loss = train_steps(model, optimizer, shard, batches, workload.local_steps)
    logits = logits_on(model, public_batch(data, workload, round_idx))
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"num-examples": len(shard[1]), "train-loss": loss, "torch-threads": torch.get_num_threads()}
            ),
            "logits": ConfigRecord({"public-logits": logits.numpy().tobytes()}),  # travels to the server
        }
    )
    return Message(content=content, reply_to=msg)


def _flower_evaluate(msg: Any, context: Any) -> Any:
    """Flower ClientApp evaluate: the global model on the test set."""
    from flwr.app import Message, MetricRecord, RecordDict

    del context
    workload = Workload.from_record(msg.content["config"])
    data = cached_data(workload)
    model = TinyCNN(workload)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics = MetricRecord({"num-examples": len(data.test_y), "accuracy": accuracy(model, data, workload)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


_FLOWER_RESULT: dict[str, Any] = {}


def _flower_server(grid: Any, context: Any) -> None:
    """Flower ServerApp main: the FedAvg strategy over every node, client-side evaluation after the last round."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    del context
    workload = Workload.from_record(_FLOWER_RESULT["workload"])

    class FedAvgFinalEvaluation(FedAvg):
        """FedAvg that evaluates on every client once, after the last round (as mhd-sim's eval_every=R)."""

        def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            if server_round < workload.rounds:
                return []
            return super().configure_evaluate(server_round, arrays, config, grid)

    clients = workload.clients
    strategy = FedAvgFinalEvaluation(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=clients,
        min_evaluate_nodes=clients,
        min_available_nodes=clients,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(build_model(workload).state_dict()),
        num_rounds=workload.rounds,
        train_config=ConfigRecord(workload.to_record()),
        evaluate_config=ConfigRecord(workload.to_record()),
    )
    final = result.evaluate_metrics_clientapp.get(workload.rounds, {})
    _FLOWER_RESULT["accuracy"] = final.get("accuracy")
    _FLOWER_RESULT["train_loss"] = [
        result.train_metrics_clientapp[round_idx]["train-loss"] for round_idx in sorted(result.train_metrics_clientapp)
    ]
    _FLOWER_RESULT["torch_threads"] = [
        result.train_metrics_clientapp[round_idx]["torch-threads"]
        for round_idx in sorted(result.train_metrics_clientapp)
    ]


def run_flower(workload: Workload, cpus: int) -> dict[str, Any]:
    """Flower's simulation engine on the workload; the apps come from this file imported as a module.

    Importing it as `bench_peers` (not `__main__`) lets Ray's client actors import the same
    functions by name, with this module's per-process data cache.
    """
    import importlib

    import flwr
    import ray
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    module = importlib.import_module("bench_peers")
    module._FLOWER_RESULT["workload"] = workload.to_record()
    client_app = ClientApp()
    client_app.train()(module._flower_train)
    client_app.evaluate()(module._flower_evaluate)
    server_app = ServerApp()
    server_app.main()(module._flower_server)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=workload.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False},
        },
    )
    result = {key: value for key, value in module._FLOWER_RESULT.items() if key != "workload"}
    if result.get("accuracy") is None:
        raise RuntimeError("Flower's run ended without the final evaluation (see its log above)")
    return {**result, "flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__}


# ---- measuring one process ---------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, start time, CPU ticks: user + system of all its threads) of a process; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[19], int(fields[11]) + int(fields[12])


def _has_tag(pid: int, tag: bytes) -> bool:
    try:
        return tag in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _pss_kib(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class TreeSampler(threading.Thread):
    """Samples the summed PSS of a process, its descendants and every process carrying its tag."""

    def __init__(self, root: int, tag: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.tag, self.interval = root, f"{TAG_VARIABLE}={tag}".encode(), interval
        self.stop_event = threading.Event()
        self.tagged: dict[tuple[int, str], bool] = {}  # (pid, start time) -> carries the tag
        self.cpu_ticks: dict[tuple[int, str], int] = {}  # (pid, start time) of a member -> its latest CPU ticks
        self.peak_kib = 0
        self.peak_processes: dict[str, float] = {}
        self.max_processes = 0
        self.samples = 0

    def members(self) -> list[int]:
        """The root, its descendants and tagged processes, now."""
        parents: dict[int, int] = {}
        keys: dict[int, tuple[tuple[int, str], int]] = {}
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            stat = _stat(pid)
            if stat is None:
                continue
            parents[pid] = stat[0]
            key = (pid, stat[1])
            keys[pid] = (key, stat[2])
            if key not in self.tagged:
                self.tagged[key] = _has_tag(pid, self.tag)
            if self.tagged[key]:
                found.append(pid)
        members = set(found)
        members.update(pid for pid in parents if self._descends(pid, parents))
        for pid in members:
            key, ticks = keys[pid]
            self.cpu_ticks[key] = ticks
        return sorted(members)

    @property
    def cpu_s(self) -> float:
        """CPU seconds of every member, as last sampled (a process's last interval before it exits is missed)."""
        return sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")

    def _descends(self, pid: int, parents: dict[int, int]) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == self.root:
                return True
            pid = parents.get(pid, 0)
            seen += 1
        return False

    def sample(self) -> list[int]:
        members = self.members()
        by_name: dict[str, float] = {}
        total = 0
        for pid in members:
            pss = _pss_kib(pid)
            if pss is None:
                continue
            total += pss
            name = _comm(pid)
            by_name[name] = by_name.get(name, 0.0) + pss / 1024
        self.samples += 1
        self.max_processes = max(self.max_processes, len(members))
        if total > self.peak_kib:
            self.peak_kib = total
            self.peak_processes = {name: round(mib, 1) for name, mib in sorted(by_name.items())}
        return members

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def leftovers(self) -> list[int]:
        """Tagged processes still alive (the root has exited)."""
        return [pid for pid in self.members() if pid != self.root]


def measure_process(
    command: list[str], env: dict[str, str], log_path: Path, interval: float, timeout: float
) -> dict[str, Any]:
    """Runs `command` in the log's directory, timing it from start to exit and sampling its process tree's PSS.

    Not in this checkout: `python -c` would import the checkout's packages from its working directory.
    """
    tag = uuid.uuid4().hex
    env = {**env, TAG_VARIABLE: tag}
    load_before = os.getloadavg()
    busy_before = _busy_cpu_s()
    self_before, children_before = _rusage_cpu_s(resource.RUSAGE_SELF), _rusage_cpu_s(resource.RUSAGE_CHILDREN)
    with log_path.open("w") as log:
        tick = time.perf_counter()
        process = subprocess.Popen(
            command, env=env, cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = TreeSampler(process.pid, tag, interval)
        sampler.start()
        try:
            returncode: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        wall_s = time.perf_counter() - tick
        sampler.stop_event.set()
        sampler.join()
    busy_s = _busy_cpu_s() - busy_before
    sampler_s = _rusage_cpu_s(resource.RUSAGE_SELF) - self_before
    # the run's processes as sampled (Ray's daemons and workers included), or as reaped, whichever saw more
    own_s = max(sampler.cpu_s, _rusage_cpu_s(resource.RUSAGE_CHILDREN) - children_before)
    other_s = max(busy_s - own_s - sampler_s, 0.0)
    left, linger_s = _reap(sampler, process)
    return {
        "wall_s": wall_s,
        "returncode": returncode,
        "timed_out": returncode is None,
        "peak_pss_mib": sampler.peak_kib / 1024,
        "pss_at_peak_by_process": sampler.peak_processes,
        "max_processes": sampler.max_processes,
        "pss_samples": sampler.samples,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "cpu_s": own_s,
        "sampler_cpu_s": sampler_s,
        "other_cpu_s": other_s,
        "other_cpu_share": other_s / (wall_s * (os.cpu_count() or 1)),
        "linger_s": linger_s,
        "killed_leftovers": left,
    }


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (every process, /proc/stat), or 0 without /proc."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _rusage_cpu_s(who: int) -> float:
    """CPU seconds of this process (RUSAGE_SELF: the sampler) or of its reaped children and their reaped descendants."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _reap(sampler: TreeSampler, process: subprocess.Popen[bytes]) -> tuple[list[int], float]:
    """Waits up to 60 s for the run's other processes (Ray's) to exit, then ends those left, by pid."""
    tick = time.perf_counter()
    if process.poll() is None:
        process.kill()
        process.wait()
    left = sampler.leftovers()
    while left and time.perf_counter() - tick < 60:
        time.sleep(0.5)
        left = sampler.leftovers()
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    return left, time.perf_counter() - tick


# ---- the systems -------------------------------------------------------------------------------------


def mhd_sim_source(rev: str | None, scratch: Path) -> dict[str, Any]:
    """Where mhd-sim runs from: this checkout as installed, or `git archive REV` unpacked into `scratch`.

    A snapshot keeps the measurement on one known commit while others edit the checkout.
    """
    repo = Path(__file__).resolve().parents[1]
    if rev is None:
        return {"source": "working tree", "root": str(repo), "pythonpath": None}
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    root = scratch / f"mhd-sim-{sha[:12]}"
    root.mkdir()
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(root)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {sha} failed")
    return {"source": f"git archive {sha}", "commit": sha, "root": str(root), "pythonpath": str(root)}


def mhd_sim_command(system: str, workload: Workload, run_dir: Path, source: dict[str, Any]) -> list[str]:
    """`mhd-sim` with the workload as overrides: the console script's entry point, run by this Python."""
    pyproject = (Path(source["root"]) / "pyproject.toml").read_text()
    entry = re.search(r'^mhd-sim\s*=\s*"([\w.]+):(\w+)"', pyproject, re.MULTILINE)  # [project.scripts]
    if entry is None:
        raise RuntimeError(f"no mhd-sim entry point in {source['root']}/pyproject.toml")
    module, function = entry.groups()
    launcher = [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]
    overrides = [
        f"method={system.removeprefix('mhd_')}",
        "data=synthetic",
        "partition=iid",
        "backbone=small_cnn",
        f"num_agents={workload.clients}",
        f"rounds={workload.rounds}",
        f"eval_every={workload.rounds}",
        f"seed={workload.seed}",
        f"train.local_steps={workload.local_steps}",
        f"train.batch_size={workload.batch_size}",
        f"train.eval_batch_size={workload.eval_batch_size}",
        f"train.optimizer.lr={workload.lr}",
        f"train.optimizer.momentum={workload.momentum}",
        f"train.optimizer.weight_decay={workload.weight_decay}",
        f"data.num_train={workload.clients * workload.samples_per_client + workload.public_size}",
        f"data.public_size={workload.public_size}",
        f"data.public_batch_size={workload.public_batch_size}",
        f"data.num_test={workload.num_test}",
        f"data.num_classes={workload.num_classes}",
        f"data.image_shape=[{','.join(str(size) for size in workload.image_shape)}]",
        f"data.noise={workload.noise}",
        "checkpoint_every=0",
        f"hydra.run.dir={run_dir}",
    ]
    if system == "mhd_mhd":
        overrides += ["model.aux_heads=0", f"train.distill_batch_size={workload.batch_size}"]
    return [*launcher, *overrides]


def worker_command(python: str, system: str, workload: Workload, result_path: Path, raw_threads: int) -> list[str]:
    return [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        system,
        "--workload",
        json.dumps(workload.to_record()),
        "--result",
        str(result_path),
        "--raw-threads",
        str(raw_threads),
    ]


def flower_status(python: str) -> dict[str, Any]:
    """Whether `python` can import flwr (with Ray, its simulation extra); its versions if so."""
    probe = "import flwr, ray, torch; print(flwr.__version__, ray.__version__, torch.__version__)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    except OSError as error:
        return {"status": "not installed", "python": python, "reason": str(error)}
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["import failed"])[-1]
        return {"status": "not installed", "python": python, "reason": reason}
    flwr_version, ray_version, torch_version = done.stdout.split()
    return {"status": "ok", "python": python, "flwr": flwr_version, "ray": ray_version, "torch": torch_version}


def run_system(system: str, workload: Workload, args: argparse.Namespace, scratch: Path, label: str) -> dict[str, Any]:
    """One measured process of `system`, and what it reported (accuracy, versions)."""
    env = dict(os.environ)
    result_path = scratch / f"{label}.result.json"
    run_dir = scratch / label
    if system in MHD_SYSTEMS:
        command = mhd_sim_command(system, workload, run_dir, args.mhd_sim)
        if args.mhd_sim["pythonpath"]:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.mhd_sim["pythonpath"], env.get("PYTHONPATH")]))
    elif system == "flower":
        command = worker_command(args.flower_python, system, workload, result_path, args.raw_threads)
        env.update({"FLWR_TELEMETRY_ENABLED": "0", LOOPBACK_SWITCH: "0"})
    else:
        command = worker_command(sys.executable, system, workload, result_path, args.raw_threads)
    log_path = scratch / f"{label}.log"
    measured = measure_process(command, env, log_path, args.sample_interval, args.timeout)
    measured["ok"] = measured["returncode"] == 0
    if system in MHD_SYSTEMS:
        measured["reported"] = _mhd_sim_summary(run_dir / "summary.json")
    elif result_path.exists():
        measured["reported"] = json.loads(result_path.read_text())
    if not measured["ok"]:
        measured["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    shutil.rmtree(run_dir, ignore_errors=True)
    return measured


def _mhd_sim_summary(path: Path) -> dict[str, Any] | None:
    """The final shared-test accuracy and mhd-sim's own timings from summary.json."""
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    main_head = summary.get("final", {}).get("heads", {}).get("main", {})
    return {
        "accuracy": main_head.get("shared_acc"),
        "sim_wall_time_s": summary.get("wall_time_s"),
        "sim_setup_time_s": summary.get("setup_time_s"),
        "round_time_s_mean": summary.get("round_time_s_mean"),
        "actors": summary.get("runtime", {}).get("actors"),
        "torch_threads": summary.get("runtime", {}).get("torch_threads"),
    }


# ---- the report ----------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]], systems: Sequence[str], flower: dict[str, Any]) -> dict[str, Any]:
    """Per K: each system's medians, mhd-sim's ratios against Flower and raw, and the wall-time target."""
    results: dict[str, Any] = {}
    for k in dict.fromkeys(run["k"] for run in runs):
        per_system: dict[str, Any] = {}
        for system in systems:
            if system == "flower" and flower["status"] != "ok":
                per_system[system] = {"status": "not installed", "reason": flower.get("reason")}
                continue
            mine = [run for run in runs if run["k"] == k and run["system"] == system]
            good = [run for run in mine if run["ok"]]
            if not good:
                per_system[system] = {"status": "failed", "repeats": len(mine)}
                continue
            accuracies = [run["reported"]["accuracy"] for run in good if (run.get("reported") or {}).get("accuracy")]
            per_system[system] = {
                "status": "ok",
                "repeats": len(good),
                "failed_repeats": len(mine) - len(good),
                "wall_s": statistics.median(run["wall_s"] for run in good),
                "peak_pss_mib": statistics.median(run["peak_pss_mib"] for run in good),
                "wall_s_all": [run["wall_s"] for run in good],
                "peak_pss_mib_all": [run["peak_pss_mib"] for run in good],
                "accuracy": statistics.median(accuracies) if accuracies else None,
            }
        results[str(k)] = {"systems": per_system, "ratios": ratios(per_system), "target": target(int(k), per_system)}
    return results


def _ratio(per_system: dict[str, Any], mine: str, theirs: str, key: str) -> float | None:
    a, b = per_system.get(mine, {}), per_system.get(theirs, {})
    if a.get("status") != "ok" or b.get("status") != "ok":
        return None
    return a[key] / b[key]


def ratios(per_system: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{mine}_vs_{theirs}": {
            "wall": _ratio(per_system, mine, theirs, "wall_s"),
            "pss": _ratio(per_system, mine, theirs, "peak_pss_mib"),
        }
        for mine in MHD_SYSTEMS
        for theirs in ("flower", "raw")
    }


def target(k: int, per_system: dict[str, Any]) -> dict[str, Any]:
    """mhd-sim's wall time over Flower's against the issue's bound for this K (none for other Ks)."""
    bound = WALL_TARGETS.get(k)
    verdicts: dict[str, Any] = {"wall_vs_flower_at_most": bound}
    for mine in MHD_SYSTEMS:
        value = _ratio(per_system, mine, "flower", "wall_s")
        if bound is None:
            verdicts[mine] = "no target at this K"
        elif value is None:
            verdicts[mine] = "not measured"
        else:
            verdicts[mine] = "met" if value <= bound else "missed"
    return verdicts


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    print(
        f"bench_peers | {report['machine']['cpu_count']} cores | median of {report['repeats']} | "
        f"Flower: {report['flower'].get('flwr', report['flower']['status'])}"
    )
    print(f"{'K':>4} {'system':<11} {'wall s':>8} {'PSS MiB':>8} {'acc':>6} {'wall x Flower':>14} {'x raw':>6} "
          f"{'PSS x Flower':>13} {'x raw':>6}")  # fmt: skip
    for k, result in report["results"].items():
        for system, numbers in result["systems"].items():
            if numbers["status"] != "ok":
                print(f"{k:>4} {system:<11} {numbers['status']}")
                continue
            row = f"{k:>4} {system:<11} {numbers['wall_s']:>8.1f} {numbers['peak_pss_mib']:>8,.0f} "
            row += f"{_fmt(numbers['accuracy'], '.3f'):>6}"
            if system in MHD_SYSTEMS:
                flower, raw = result["ratios"][f"{system}_vs_flower"], result["ratios"][f"{system}_vs_raw"]
                row += f" {_fmt(flower['wall'], '.2f'):>14} {_fmt(raw['wall'], '.2f'):>6}"
                row += f" {_fmt(flower['pss'], '.2f'):>13} {_fmt(raw['pss'], '.2f'):>6}"
            print(row)
        verdict = result["target"]
        if verdict["wall_vs_flower_at_most"] is not None:
            print(
                f"     target wall <= {verdict['wall_vs_flower_at_most']}x Flower: "
                f"mhd_fedavg {verdict['mhd_fedavg']}, mhd_mhd {verdict['mhd_mhd']}"
            )
    if report["flower"]["status"] == "not installed":
        print(f"note: Flower not installed for {report['flower']['python']}: {report['flower'].get('reason')}")


def machine_facts() -> dict[str, Any]:
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], capture_output=True, text=True, check=False, cwd=Path(__file__).parent)
        return done.stdout.strip()

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def wait_for_load(threshold: float | None, max_wait_s: float, poll_s: float = 60) -> dict[str, Any]:
    """Polls the 1-minute load average every `poll_s` until it is <= threshold (or max_wait_s has passed)."""
    tick = time.perf_counter()
    load = os.getloadavg()
    while threshold is not None and load[0] > threshold and time.perf_counter() - tick < max_wait_s:
        print(f"bench_peers: 1-minute load {load[0]:.2f} > {threshold}; waiting", file=sys.stderr, flush=True)
        time.sleep(poll_s)
        load = os.getloadavg()
    return {"threshold": threshold, "waited_s": time.perf_counter() - tick, "load_at_start": list(load)}


def workloads(args: argparse.Namespace) -> dict[int, Workload]:
    overrides = {
        name: getattr(args, name)
        for name in ("local_steps", "batch_size", "samples_per_client", "rounds", "num_test", "public_size",
                     "public_batch_size")
        if getattr(args, name) is not None
    }  # fmt: skip
    return {k: Workload(clients=k, **{**SETTINGS.get(k, NORMAL), **overrides}) for k in args.ks}


def schedule(ks: Sequence[int], systems: Sequence[str], repeats: int) -> Iterator[tuple[int, int, str]]:
    """Per K, the systems interleaved: A B C D A B C D ..."""
    for k in ks:
        for repeat in range(repeats):
            for system in systems:
                yield k, repeat, system


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ks", type=lambda text: [int(k) for k in text.split(",")], default=[8, 32, 200])
    parser.add_argument(
        "--systems", type=lambda text: text.split(","), default=list(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each system per K; medians are reported (2)")
    parser.add_argument(
        "--flower-python",
        default=os.environ.get("BENCH_PEERS_FLOWER_PYTHON", sys.executable),
        help="Python of a venv with flwr[simulation] (default: $BENCH_PEERS_FLOWER_PYTHON, else this Python)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_peers.json"), help="JSON output (bench_peers.json)")
    parser.add_argument("--sample-interval", type=float, default=0.25, help="seconds between PSS samples (0.25)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one process may run (1800)")
    parser.add_argument(
        "--raw-threads",
        type=int,
        default=1,
        help="torch threads of the raw loop (1: on a shared, oversubscribed machine 2 threads ran it ~20x slower)",
    )
    parser.add_argument(
        "--mhd-sim-rev",
        default=None,
        help="run mhd-sim from `git archive REV` of this repository (default: the checkout as installed)",
    )
    parser.add_argument("--wait-load", type=float, default=None, help="wait until the 1-minute load is <= this")
    parser.add_argument(
        "--gate-load",
        type=float,
        default=None,
        help="before each run, wait until the 1-minute load is <= this (polls every 15 s; a run's own load decays)",
    )
    parser.add_argument(
        "--wait-max-s", type=float, default=2400, help="longest wait for --wait-load, and for each --gate-load (2400)"
    )
    for name in ("local-steps", "batch-size", "samples-per-client", "rounds", "num-test", "public-size",
                 "public-batch-size"):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=None, help="override the setting for every K")
    parser.add_argument("--worker", choices=("raw", "flower"), help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {','.join(unknown)}; choose from {','.join(SYSTEMS)}")
    if args.repeats < 1 or any(k < 3 for k in args.ks):
        parser.error("--repeats must be >= 1 and every K >= 3 (mhd_mhd's ring)")
    return args


def worker_main(args: argparse.Namespace) -> None:
    """Inside a measured process: run one system and write what it reports."""
    workload = Workload.from_record(json.loads(args.workload))
    raw = args.worker == "raw"
    result = run_raw(workload, args.raw_threads) if raw else run_flower(workload, os.cpu_count() or 1)
    args.result.write_text(json.dumps(result) + "\n")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every (K, repeat, system) as its own process, prints the table, writes and returns the report."""
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return {}
    settings = workloads(args)
    flower = flower_status(args.flower_python) if "flower" in args.systems else {"status": "not requested"}
    load = wait_for_load(args.wait_load, args.wait_max_s)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as scratch:
        args.mhd_sim = mhd_sim_source(args.mhd_sim_rev, Path(scratch))
        for k, repeat, system in schedule(args.ks, args.systems, args.repeats):
            if system == "flower" and flower["status"] != "ok":
                continue
            label = f"k{k}_{system}_{repeat}"
            gate = wait_for_load(args.gate_load, args.wait_max_s, poll_s=15) if args.gate_load else None
            print(f"bench_peers: {label} (1-minute load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
            measured = run_system(system, settings[k], args, Path(scratch), label)
            runs.append({"k": k, "system": system, "repeat": repeat, "gate": gate, **measured})
    report = {
        "command": ["python", "scripts/bench_peers.py", *(sys.argv[1:] if argv is None else argv)],
        "machine": machine_facts(),
        "mhd_sim": {key: value for key, value in args.mhd_sim.items() if key in ("source", "commit")},
        "load": {**load, "load_at_end": list(os.getloadavg())},
        "repeats": args.repeats,
        "raw_threads": args.raw_threads,
        "flower": flower,
        "settings": {
            str(k): {**workload.to_record(), "train_samples_per_round": workload.train_samples_per_round}
            for k, workload in settings.items()
        },
        "targets": {str(k): bound for k, bound in WALL_TARGETS.items()},
        "workload_differences": WORKLOAD_DIFFERENCES,
        "results": summarise(runs, args.systems, flower),
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report


if __name__ == "__main__":
    main()
