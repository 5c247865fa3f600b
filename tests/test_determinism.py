"""Same seed, same numbers: across repeats, backends and agents-per-actor groupings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sim.run.main import run
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.slow


def _final(tmp_path: Path, name: str, *overrides: str) -> dict[str, Any]:
    summary = run(make_config(*TINY, *overrides), tmp_path / name)
    assert summary["status"] == "completed"
    return summary["final"]


def test_serial_ray_and_groupings_give_identical_results(ray_session: None, tmp_path: Path) -> None:
    serial = _final(tmp_path, "serial", "runtime.backend=serial")
    assert serial == _final(tmp_path, "serial-again", "runtime.backend=serial")
    assert serial == _final(tmp_path, "ray-2x2", "runtime.backend=ray", "runtime.agents_per_actor=2")
    assert serial == _final(
        tmp_path, "ray-4x1", "runtime.backend=ray", "runtime.agents_per_actor=1", "runtime.num_cpus_per_actor=0.5"
    )


def test_a_different_seed_gives_different_results(tmp_path: Path) -> None:
    first = _final(tmp_path, "seed0", "runtime.backend=serial")
    assert first != _final(tmp_path, "seed1", "runtime.backend=serial", "seed=1")
