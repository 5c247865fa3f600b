"""Which Ray a run connects to, checked without importing Ray or torch.

`mhd-sim` reads the target from the composed config before anything heavy is imported, and
starts that Ray early (sim.backends.ray.connection); the full checks (sim.experiment.settings)
apply `check_cluster_address` to it again with every other runtime value.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sim.core.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sim.backends.runtime import RuntimeConfig

ADDRESS_TIMEOUT_S = 3.0
"""A reachable Ray head accepts a TCP connection in milliseconds; 3 s also covers a slow WAN link."""

RAY_ADDRESS_VARIABLE = "RAY_ADDRESS"
"""Set by Ray for the entrypoint of a Ray job, and by users who attach every script to one cluster."""


@dataclass(frozen=True)
class RayTarget:
    """The Ray a run connects to: the three runtime values `ray.init` depends on."""

    address: str | None  # None: start a local Ray on loopback
    num_cpus: int | None  # CPUs of a local Ray; None: all of this machine
    ship_code: bool  # upload mhd-sim's packages with the job (attaching to a cluster)

    @classmethod
    def of(cls, runtime: RuntimeConfig) -> RayTarget:
        return cls(runtime.address, runtime.num_cpus, runtime.cluster.ship_code)

    @classmethod
    def requested(cls, runtime: DictConfig) -> RayTarget | None:
        """The target a composed, not yet checked `runtime` group asks for; None if it is not plainly valid.

        Read before the full checks run (they import torch), so anything unusual returns None
        rather than an error: the run then starts no Ray early and the checks name the problem.
        """
        address, num_cpus, ship_code = runtime.get("address"), runtime.get("num_cpus"), runtime.get("ship_code")
        if runtime.get("backend") != "ray" or not isinstance(ship_code, bool):
            return None
        if not (address is None or (isinstance(address, str) and address)):
            return None
        if not (num_cpus is None or (type(num_cpus) is int and num_cpus > 0)):
            return None
        target = cls(address, num_cpus, ship_code)
        try:
            check_cluster_address(target)
        except ConfigError:
            return None
        return target


def check_cluster_address(target: RayTarget) -> None:
    """Rejects a Ray address that cannot work, before ray.init retries it or starts a second Ray.

    - No address inside a Ray cluster (RAY_ADDRESS set, as in a Ray job): a local Ray would
      be a second Ray instance on a cluster node, competing with it for the same CPUs and GPUs.
    - An address with runtime.num_cpus: a running cluster's size is set by its nodes.
    - A HOST:PORT that does not accept a TCP connection. `auto` (find the cluster this machine
      belongs to) is left to Ray.
    """
    if target.address is None:
        inside = os.environ.get(RAY_ADDRESS_VARIABLE)
        if inside:
            raise ConfigError(
                "runtime.address",
                None,
                f"auto here ({RAY_ADDRESS_VARIABLE}={inside} says this runs inside a Ray cluster; null would start "
                "a second Ray on this node): use runtime=cluster or runtime.address=auto",
            )
        return
    if target.num_cpus is not None:
        raise ConfigError("runtime.num_cpus", target.num_cpus, "null when runtime.address is set (nodes set the size)")
    if target.address == "auto":
        return
    host, port = _host_port(target.address)
    try:
        socket.create_connection((host, port), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as error:
        raise ConfigError(
            "runtime.address", target.address, f"a reachable Ray cluster ({host}:{port}: {error.strerror or error})"
        ) from None


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("runtime.address", address, "null, auto, HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), int(port)
