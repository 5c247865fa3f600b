"""Whole-process wall time of `mhd-sim rounds=1`, cold and attached to a running Ray, against the floor.

    python scripts/bench_startup.py [--repeats 5] [--out bench_startup.json] [OVERRIDE ...]

Four kinds of process, each run --repeats times from a fresh `python` (the numbers a user
feels from the shell), reported as median, min and max, and as ratios of the medians to the
floor's:

    floor  a Python process that imports torch and ray, starts a local Ray on loopback exactly as
           `mhd-sim` does (sim.backends.ray.connection.connect_ray) and stops it: what any Ray program
           on this machine pays before it does anything
    cold   `mhd-sim rounds=1 [OVERRIDE ...]`: starts and stops its own Ray
    attached  `mhd-sim rounds=1 runtime.address=auto [OVERRIDE ...]` attached to a Ray that this
           script started before with `ray start --head --node-ip-address=127.0.0.1` and stops
           after the last run: every run starts new worker processes on it
    warm   the same with `runtime.keep_actors=true` (the warm mode of docs/performance.md): the
           workers outlive each run and the next one reuses them; one run before the timed ones
           creates them (its time is reported as `warm_first_s`)

The floor and cold runs alternate, so that a change of load on the machine hits both; the
attached runs follow, then the warm ones (an attached run retires idle kept workers). The
script's Ray uses its own temp dir, free ports and a random token (RAY_AUTH_MODE=token,
RAY_AUTH_TOKEN), so it neither finds nor disturbs another Ray on the machine, and it stops only
that Ray. Each mhd-sim run's own summary.json times (actor
start-up, rounds) and the load average are kept with its sample. Targets (docs/performance.md):
cold <= 1.4x and warm <= 0.6x the floor (attached has none: it shows what keeping workers saves).

Each sample also has its CPU seconds (user + system, read from /proc every 0.1 s): the process
and all its descendants (a local Ray's processes and workers), plus, for an attached or warm run,
what the head's processes spent meanwhile (its workers included). CPU time changes far less than wall
time when other jobs load the machine, so it compares runs measured under different loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PYTHON = sys.executable
MHD_SIM = shutil.which("mhd-sim", path=str(Path(sys.executable).parent)) or "mhd-sim"
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"

TARGETS = {"cold_vs_floor": 1.4, "warm_vs_floor": 0.6}
KINDS = ("floor", "cold", "attached", "warm")
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a node's servers bind to 127.0.0.1 only
RUN_TIMEOUT_S = 300
HEAD_START_TIMEOUT_S = 120
HEAD_STOP_TIMEOUT_S = 30

# The floor: what sim.backends.ray.connection.connect_ray does for a local Ray (loopback_only sets
# LOOPBACK_SWITCH before ray.init; here it is set before ray is imported, which Ray reads the same way).
FLOOR_CODE = """
import logging, os
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import torch
import ray
ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
ray.shutdown()
"""

HEAD_PORT_FLAGS = (
    "port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (each probe stays bound until all are chosen)."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            ports.append(int(probe.getsockname()[1]))
    return ports


def timed(command: Sequence[str], env: dict[str, str], cwd: Path, head: int | None = None) -> tuple[float, float]:
    """Wall time of `command` from spawn to exit, and the CPU seconds of its process tree.

    With `head` (a `ray start` node's session), the CPU that node's processes spent meanwhile
    counts too: the workers of an attached run are the head's children. A failure stops the
    benchmark.
    """
    started = time.perf_counter()
    process = subprocess.Popen(
        list(command), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    with CpuSampler(process.pid, head) as sampler:
        try:
            _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{stderr[-3000:]}")
    return elapsed, sampler.cpu_s()


class CpuSampler(threading.Thread):
    """CPU seconds (user + system) of a process tree and of a session, read from /proc every 0.1 s.

    Each process counts with its last reading, so up to 0.1 s of a process's last moments is
    missed; a session's processes count only what they spent after the sampler started.
    """

    INTERVAL_S = 0.1

    def __init__(self, root: int, session: int | None) -> None:
        super().__init__(daemon=True)
        self.root, self.session = root, session
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.stop = threading.Event()
        self.baseline = {key: cpu for key, (_, in_session, cpu) in self._scan().items() if in_session}
        self.last: dict[tuple[int, int], int] = {}

    def __enter__(self) -> CpuSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()
        self._sample()

    def run(self) -> None:
        while not self.stop.wait(self.INTERVAL_S):
            self._sample()

    def cpu_s(self) -> float:
        return sum(cpu - self.baseline.get(key, 0) for key, cpu in self.last.items()) / self.ticks

    def _sample(self) -> None:
        processes = self._scan()
        children: dict[int, list[tuple[int, int]]] = {}
        for key, (parent, _, _) in processes.items():
            children.setdefault(parent, []).append(key)
        tree = [key for key in processes if key[0] == self.root]
        for key in tree:  # grows while it is walked: every descendant of the root
            tree.extend(children.get(key[0], []))
        for key in [*tree, *(key for key, (_, in_session, _) in processes.items() if in_session)]:
            self.last[key] = processes[key][2]

    def _scan(self) -> dict[tuple[int, int], tuple[int, bool, int]]:
        """(pid, start time) -> (parent pid, in the session, utime + stime in ticks) of every process."""
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after the name: state, ppid, pgrp, session
                key = (int(stat.parent.name), int(fields[19]))  # the start time tells a reused pid apart
                found[key] = (int(fields[1]), int(fields[3]) == self.session, int(fields[11]) + int(fields[12]))
        return found


def sample(
    kind: str, command: Sequence[str], env: dict[str, str], cwd: Path, run_dir: Path | None, head: int | None = None
) -> dict[str, Any]:
    """One timed process; with `head`, its CPU time includes what that node's processes spent meanwhile."""
    load_before = os.getloadavg()[0]
    wall, cpu = timed(command, env, cwd, head)
    found: dict[str, Any] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 2)}
    found["load_1min_before"] = round(load_before, 2)
    if run_dir is not None:
        summary = json.loads((run_dir / "summary.json").read_text())
        found |= {key: summary.get(key) for key in ("wall_time_s", "setup_time_s", "round_time_s_mean")}
        found["kept_actors"] = summary["runtime"].get("kept_actors")  # warm: how many workers it reused
        found["report_written"] = (run_dir / "report.html").is_file()
    print(f"  {kind:<5} {wall:6.2f} s wall {cpu:6.2f} s CPU  (load {load_before:.2f})", flush=True)
    return found


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [entry["wall_s"] for entry in samples]
    return {
        "median_s": round(statistics.median(walls), 3),
        "min_s": min(walls),
        "max_s": max(walls),
        "cpu_median_s": round(statistics.median(entry["cpu_s"] for entry in samples), 2),
        "samples": samples,
    }


def clean_env() -> dict[str, str]:
    """This process's environment without Ray's variables (an address or token set in the shell)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("RAY_")} | {
        "RAY_USAGE_STATS_ENABLED": "0"
    }


@contextlib.contextmanager
def running_head(temp_dir: Path) -> Iterator[tuple[dict[str, str], float, int]]:
    """`ray start --head` on 127.0.0.1 with token auth.

    Yields the drivers' environment, the seconds the head took to start and its session id.
    """
    ports = dict(zip(HEAD_PORT_FLAGS, free_ports(len(HEAD_PORT_FLAGS)), strict=True))
    env = clean_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # The head's servers listen on 127.0.0.1 only, as those of mhd-sim's own local Ray do; a driver
    # needs the switch too, or Ray swaps 127.0.0.1 in the address for the machine's own IP.
    env[LOOPBACK_SWITCH] = "0"
    log = temp_dir / "head.log"
    command = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir / 'ray'}"]
    command += ["--include-dashboard=false", "--disable-usage-stats", "--block"]
    command += [f"--{flag}={port}" for flag, port in ports.items()]
    started = time.perf_counter()
    with log.open("wb") as output:
        head = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while b"Ray runtime started" not in log.read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        start_s = time.perf_counter() - started
        yield env | {"RAY_ADDRESS": f"127.0.0.1:{ports['port']}"}, start_s, head.pid  # its session: its pid
    finally:
        stop_head(head)


def stop_head(head: subprocess.Popen[bytes]) -> None:
    """SIGTERM makes `ray start --block` stop its node; whatever is left of its process group is killed."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=HEAD_STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)  # its group id is its pid (start_new_session)
    head.wait()


def machine_facts() -> dict[str, Any]:
    versions = subprocess.run(
        [PYTHON, "-c", "import torch, ray; print(torch.__version__, ray.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": versions[0],
        "ray": versions[1],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both mhd-sim runs, after rounds=1")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each kind (5)")
    parser.add_argument("--out", type=Path, default=Path("bench_startup.json"), help="JSON output (bench_startup.json)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    args = parser.parse_intermixed_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.kinds = args.kinds.split(",")
    if not args.kinds or set(args.kinds) - set(KINDS):
        parser.error(f"--kinds takes {', '.join(KINDS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the floor, cold and warm processes, prints the medians and ratios, writes and returns the report."""
    args = parse_args(argv)
    overrides = ["rounds=1", *args.overrides]
    samples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.kinds}
    load_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="mhd-startup-", dir="/tmp"))  # short: Ray's socket paths
    try:
        env = clean_env()
        for index in range(args.repeats):
            if "floor" in samples:
                samples["floor"].append(sample("floor", [PYTHON, "-c", FLOOR_CODE], env, scratch, None))
            if "cold" in samples:
                run_dir = scratch / f"cold-{index}"
                command = [MHD_SIM, *overrides, f"hydra.run.dir={run_dir}"]
                samples["cold"].append(sample("cold", command, env, scratch, run_dir))
        head_start_s = warm_first_s = None
        if "attached" in samples or "warm" in samples:
            with running_head(scratch) as (warm_env, head_start_s, head):
                print(f"  ray start --head: {head_start_s:.2f} s", flush=True)
                attach = [MHD_SIM, *overrides, "runtime.address=auto"]
                for index in range(args.repeats if "attached" in samples else 0):
                    run_dir = scratch / f"attached-{index}"
                    samples["attached"].append(
                        sample("attached", [*attach, f"hydra.run.dir={run_dir}"], warm_env, scratch, run_dir, head)
                    )
                if "warm" in samples:
                    keep = [*attach, "runtime.keep_actors=true"]
                    first = sample("first", [*keep, f"hydra.run.dir={scratch / 'warm-first'}"], warm_env, scratch, None)
                    warm_first_s = first["wall_s"]
                    for index in range(args.repeats):
                        run_dir = scratch / f"warm-{index}"
                        samples["warm"].append(
                            sample("warm", [*keep, f"hydra.run.dir={run_dir}"], warm_env, scratch, run_dir, head)
                        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = {kind: summarise(found) for kind, found in samples.items()}
    floor = results.get("floor")
    for kind in KINDS[1:]:
        if kind in results:
            ratio = None if floor is None else results[kind]["median_s"] / floor["median_s"]
            results[kind]["vs_floor"] = None if ratio is None else round(ratio, 3)
    report = {
        "overrides": overrides,
        "repeats": args.repeats,
        "machine": machine_facts(),
        "load_avg_1_5_15": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "head_start_s": None if head_start_s is None else round(head_start_s, 3),
        "warm_first_s": warm_first_s,
        "targets": TARGETS,
        "results": results,
    }
    print_table(report)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"start-up | mhd-sim {' '.join(report['overrides'])} | {report['repeats']} runs each | median (min-max)")
    for kind, result in report["results"].items():
        ratio = result.get("vs_floor")
        target = TARGETS.get(f"{kind}_vs_floor")
        spread = f"({result['min_s']:.2f}-{result['max_s']:.2f})"
        target_text = "" if target is None else f" (target <= {target}x)"
        versus = "" if ratio is None else f"  {ratio:.2f}x floor{target_text}"
        print(f"{kind:<8} {result['median_s']:6.2f} s {spread:<13} CPU {result['cpu_median_s']:6.2f} s{versus}")
    load = report["load_avg_1_5_15"]
    print(f"load average (1, 5, 15 min): {load['start']} at start, {load['end']} at end")


if __name__ == "__main__":
    main()
