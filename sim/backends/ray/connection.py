"""This process's connection to Ray: start a local Ray on loopback or attach to a cluster, early.

Nothing here imports torch (or anything that does): `mhd-sim` starts Ray from this module as soon
as the command line has composed, and imports torch while Ray's processes come up on another
core (docs/performance.md, Start-up). The backend (sim.backends.ray.backend) connects through
`connect_ray`, which takes over a Ray started early instead of starting a second one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import ray
from ray._private import ray_constants  # the loopback switch as the driver read it (see loopback_only)

from sim.backends.ray.address import RayTarget
from sim.core.errors import ConfigError

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's nodes bind to 127.0.0.1 only
INIT_LOG_LEVEL = logging.ERROR  # the "ray" logger's level during ray.init (see init_ray); WARNING after


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Starts a single-node Ray on 127.0.0.1 instead of the machine's own address.

    Ray reads the switch twice: its processes (raylet, workers) from the environment they
    inherit, and this driver from `ray_constants.ENABLE_RAY_CLUSTER`, computed once when ray was
    first imported, which setting the variable now no longer changes. Both are set for the
    start-up and restored after it, so a later attach to a real cluster from this process still
    gets the machine's address.
    """
    saved_env, saved_flag = os.environ.get(LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            del os.environ[LOOPBACK_SWITCH]
        else:
            os.environ[LOOPBACK_SWITCH] = saved_env


def init_ray(target: RayTarget) -> None:
    """`ray.init` for `target`: a new local Ray on loopback, or attached to `target.address`.

    "local" makes Ray start a new instance even where `ray start` left an address behind;
    sim.backends.ray.address.check_cluster_address has rejected a missing address inside a cluster.
    Ray's own warnings while it starts are left out (INIT_LOG_LEVEL): the two it gives every run
    are about this start-up itself (no SIGTERM handler in a thread that is not the main one; token
    authentication on, which mhd-sim's loopback-only Ray leaves as Ray sets it), and a bad value
    that a check finds while Ray starts must still be the only line on stderr. Later warnings show.
    """
    try:
        if target.address is None:
            with loopback_only():
                ray.init(
                    address="local", num_cpus=target.num_cpus, include_dashboard=False, logging_level=INIT_LOG_LEVEL
                )
            return
        _attach(target)
    finally:
        logging.getLogger("ray").setLevel(logging.WARNING)


def _attach(target: RayTarget) -> None:
    runtime_env = None
    if target.ship_code:
        from sim.backends.ray.cluster import shipped_code  # imports the agents (torch): only for a cluster job

        runtime_env = shipped_code()
    try:
        ray.init(address=target.address, runtime_env=runtime_env, logging_level=INIT_LOG_LEVEL)
    except ConnectionError as error:  # no cluster there, or one that refuses this driver's token
        reason = " ".join(str(error).split())
        raise ConfigError(
            "runtime.address",
            target.address,
            f"a Ray cluster this driver can join ({reason}; with token authentication, RAY_AUTH_MODE=token "
            "and the cluster's token must be set here too)",
        ) from None


class EarlyRay:
    """This process's Ray, started (or attached to) in a thread while the driver still checks and builds its run.

    Starting a local Ray takes seconds, mostly waiting for its GCS and raylet processes to come up
    on another core, and attaching to a running one ~0.4 s; `mhd-sim` begins either as soon as the
    command line has composed, so that it overlaps importing torch, checking the values and
    building the experiment (docs/performance.md, Start-up). A check that fails then stops it
    (`abandon`). The thread stays alive until Ray is shut down: a local Ray's processes are
    started with PR_SET_PDEATHSIG, which Linux delivers when the *thread* that started them exits.
    """

    pending: EarlyRay | None = None  # the start `connect_ray` will take over
    running: EarlyRay | None = None  # the keeper thread of the Ray in use

    def __init__(self, target: RayTarget) -> None:
        self.target = target
        self.ready = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._keep, name="mhd-sim-ray", daemon=True)

    @classmethod
    def start(cls, target: RayTarget) -> None:
        cls.pending = early = cls(target)
        early.thread.start()

    def _keep(self) -> None:
        try:
            init_ray(self.target)
        except BaseException as error:  # connect_ray re-raises it in the driver's thread
            self.error = error
        finally:
            self.ready.set()
        self.release.wait()

    @classmethod
    def take(cls, target: RayTarget) -> bool:
        """Wait for the early start of the Ray `target` names; False if there is none to take."""
        early, cls.pending = cls.pending, None
        if early is None:
            return False
        early.ready.wait()
        if early.error is not None:
            raise early.error
        cls.running = early
        if target != early.target:  # not the Ray this run asked for
            shutdown_ray()
            return False
        return True

    @classmethod
    def abandon(cls) -> None:
        """Stops a Ray started early for a run that will not happen (its config failed a check)."""
        early, cls.pending = cls.pending, None
        if early is None:
            return
        early.ready.wait()
        cls.running = early
        shutdown_ray()


def shutdown_ray() -> None:
    """ray.shutdown, then let the thread that started Ray (if one did) end."""
    ray.shutdown()
    running, EarlyRay.running = EarlyRay.running, None
    if running is not None:
        running.release.set()


def connect_ray(target: RayTarget) -> bool:
    """Attach to `target.address`, or start a new local Ray on loopback; True if connected here.

    A Ray that `EarlyRay` is starting already is waited for instead.
    """
    if EarlyRay.take(target):
        return True
    if ray.is_initialized():
        return False
    init_ray(target)
    return True
