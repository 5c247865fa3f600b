"""Kept actors (`runtime.keep_actors`, the warm mode): workers that outlive a run, for the next one.

A run attached to a running Ray (`runtime.address`) normally starts its worker processes and
kills them at the end, so every run pays a new process that imports torch (1-2 s each on this
machine's cores, docs/performance.md "Warm mode"). With `runtime.keep_actors=true` the workers are
detached, named actors in the KEPT_NAMESPACE namespace of that Ray. After the run they drop their
agents and wait; the next run that needs workers of the same *kind* takes them over and sets them
up from scratch, as after a restart, so a run's results never depend on which process hosts it.

A kind is everything a worker process fixes when it starts: its resource request, its execution
settings, its actor class and the code and library versions it imported (`kind_key`). A run never
takes a worker of another kind. Whenever a run attaches, idle kept workers of kinds it does not
use are killed, so an idle pool never holds the resources a different run needs; a kept worker
that no run has used for `runtime.kept_idle_s` exits by itself.

One driver holds a kept worker at a time (agents.actor.Lease); a driver that died without
releasing it does not keep it from the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import ray

from agents.actor import Owner
from agents.agent import ExecutionConfig
from sim.backends.ray.cluster import SHIPPED_PACKAGES
from sim.backends.ray.placement import ActorRequest

KEPT_NAMESPACE = "mhd-sim-kept"
"""The Ray namespace of kept workers; their names are `KIND.UNIQUE`."""

VERSIONED_DISTRIBUTIONS = ("torch", "numpy", "ray")
"""Libraries a worker has imported for good: a new version installed since makes it stale."""


def code_digest() -> str:
    """Hash of mhd-sim's shipped packages (every file) and the library versions a worker imports.

    A worker runs the code it imported when it started; after an edit (or an upgrade) it is
    of another kind, so an edited checkout never runs on stale workers.
    """
    digest = hashlib.sha256()
    for package in SHIPPED_PACKAGES:
        root = Path(str(importlib.import_module(package).__file__)).parent
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    for name in VERSIONED_DISTRIBUTIONS:
        digest.update(f"{name}=={metadata.version(name)}".encode())
    return digest.hexdigest()


def kind_key(request: ActorRequest, execution: ExecutionConfig, shards: str, digest: str) -> str:
    """What a worker fixes when it starts, as 16 hex digits (the first part of its name)."""
    kind = repr((sorted(request.amounts.items()), execution, shards, digest))
    return hashlib.sha256(kind.encode()).hexdigest()[:16]


class KeptActors:
    """This driver's side of the pool: takes, creates and releases kept workers."""

    def __init__(self) -> None:
        token = uuid.uuid4().hex
        self.owner: Owner = (token, [ray.put(token)])  # readable while this driver lives
        self.held: set[str] = set()  # names of the workers this driver took
        self.reused = 0
        self.created = 0

    def take(self, kinds: list[str], create: Callable[[int, str], Any], timeout_s: float) -> list[Any]:
        """A worker for each of `kinds`: a free kept one of that kind, else a new one `create(index, name)` makes.

        New workers are all created before any is waited for, so their start-ups overlap. If
        they have not started within `timeout_s` (other jobs hold the resources), they are
        killed, so that no detached worker is left waiting for resources, and GetTimeoutError
        is raised.
        """
        listed = kept_names()  # once: every kind looks through the same list
        actors: list[Any] = [self._free_one(kind, listed) for kind in kinds]
        self.reused += sum(actor is not None for actor in actors)
        missing = [index for index, actor in enumerate(actors) if actor is None]
        while missing:
            names = {index: f"{kinds[index]}.{uuid.uuid4().hex[:12]}" for index in missing}
            created = {index: create(index, name) for index, name in names.items()}
            try:
                held = ray.get([actor.acquire.remote(self.owner) for actor in created.values()], timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                for actor in [*created.values(), *(actor for actor in actors if actor is not None)]:
                    ray.kill(actor, no_restart=True)
                raise
            for (index, actor), ours in zip(created.items(), held, strict=True):
                if ours:  # else another driver listed it first and holds it: make one more
                    actors[index] = actor
                    self.held.add(names[index])
                    self.created += 1
            missing = [index for index in missing if actors[index] is None]
        return actors

    def _free_one(self, kind: str, listed: list[str]) -> Any | None:
        for name in listed:
            if name.partition(".")[0] != kind or name in self.held:
                continue
            actor = _named(name)
            if actor is not None and acquire(actor, self.owner):
                self.held.add(name)
                return actor
        return None

    def hold(self, actors: list[Any]) -> list[bool]:
        """Acquire `actors` again (after a restart, Ray re-ran their constructors and their lease was lost)."""
        return [bool(held) for held in ray.get([actor.acquire.remote(self.owner) for actor in actors])]

    def release(self, actors: list[Any]) -> None:
        """After the run: each worker drops its agents and waits for the next run; dead ones are skipped."""
        for call in [actor.release.remote() for actor in actors]:
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(call)


def acquire(actor: Any, owner: Owner, evicting: bool = False) -> bool:
    """Whether `owner` now holds the kept worker `actor` (False if another live driver does, or it is exiting)."""
    try:
        return bool(ray.get(actor.acquire.remote(owner, evicting)))
    except ray.exceptions.RayActorError:  # retired or dying meanwhile
        return False


def _named(name: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=KEPT_NAMESPACE)
    except ValueError:  # exited since it was listed
        return None


def kept_names() -> list[str]:
    return sorted(
        str(entry["name"])
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == KEPT_NAMESPACE
    )


def evict_idle(keep_kinds: set[str], owner: Owner) -> None:
    """Kill the idle kept workers whose kind is not in `keep_kinds`, so their resources are free.

    A worker held by a live driver is left alone, and so is a new one that its creator has not
    claimed yet; taking it over (`owner`) first makes sure no other driver starts using it while
    it is being killed.
    """
    for name in kept_names():
        if name.partition(".")[0] in keep_kinds:
            continue
        actor = _named(name)
        if actor is not None and acquire(actor, owner, evicting=True):
            with contextlib.suppress(ray.exceptions.RayActorError):  # exiting meanwhile
                ray.kill(actor, no_restart=True)
