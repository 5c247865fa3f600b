"""The layers of the code (docs/design.md#layers): no module imports a layer above its own.

Every import is counted: at module level, inside functions (lazy imports still run, and the
lazy ones are exactly where an upward reach hides), and under `if TYPE_CHECKING:` (a type
named from a higher layer is a dependency of the design even when it costs nothing at run
time, and mypy follows it: a cycle through annotations is still a cycle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sim", "agents", "topologies")

# Lowest first. A module may import its own layer and any layer of a lower rank; layers that
# share a rank (agents, topologies) may not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("foundations",),  # sim.core: errors, registry, seeding, validation
    ("agents", "topologies"),  # the pure-PyTorch agent; communication graphs
    ("data",),  # sim.data: datasets, loaders, partitioners
    ("backends",),  # sim.backends: serial, Ray (actors' placement, cluster, shards), fault injection
    ("experiment",),  # sim.experiment: config checks, methods, mixing, convergence rule, assembly
    ("reporting",),  # sim.reporting: metrics, sinks, plots, run dirs, reports, sweep tables
    ("run",),  # sim.run: CLI, preflight, run loop, exchange, checkpoints, interrupts
)

# Module prefix -> layer; the longest prefix wins. `sim` itself is the package marker (it
# imports nothing), so it counts as a foundation.
PREFIXES = {
    "sim": "foundations",
    "sim.core": "foundations",
    "agents": "agents",
    "topologies": "topologies",
    "sim.data": "data",
    "sim.backends": "backends",
    "sim.experiment": "experiment",
    "sim.reporting": "reporting",
    "sim.run": "run",
}
RANK = {layer: rank for rank, layers in enumerate(LAYERS) for layer in layers}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """The layer of a module of this project; None for anything else (torch, ray, the stdlib)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in PREFIXES:
            return PREFIXES[prefix]
    return None


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, wherever it is; `from pkg import sub` names pkg.sub."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
    return found


def violations() -> list[str]:
    found = []
    for module, path in MODULES.items():
        own = layer_of(module)
        assert own is not None, f"{module} is in no layer: add it to PREFIXES in tests/test_layers.py"
        for line, target in imported_modules(module, path):
            other = layer_of(target)
            if other is None or other == own:
                continue
            if RANK[other] >= RANK[own]:
                where = path.relative_to(ROOT)
                found.append(f"{where}:{line}: {module} ({own}) imports {target} ({other})")
    return found


def test_the_walk_sees_the_packages():
    assert {"sim.core.errors", "agents.agent", "topologies.build", "sim.run.cli"} <= set(MODULES)
    assert len(MODULES) > 60


def test_no_module_imports_a_higher_or_sibling_layer():
    found = violations()
    assert not found, "imports that reach up the layers (docs/design.md#layers):\n" + "\n".join(found)


def test_sim_package_imports_nothing():
    """`import sim.core` must not run any driver code: the package's __init__ imports nothing."""
    for package in ("sim", "sim.core"):
        assert imported_modules(package, MODULES[package]) == [], f"{package}/__init__.py imports something"


def test_agents_and_topologies_load_no_driver_code():
    """At run time too: importing the agent and the graphs loads no sim module outside sim.core."""
    code = (
        "import sys, agents.agent, agents.hosting, agents.weight_sharing, topologies\n"
        "print(' '.join(sorted(m for m in sys.modules if m == 'sim' or m.startswith('sim.'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = result.stdout.split()
    outside = [name for name in loaded if name != "sim" and not name.startswith("sim.core")]
    assert not outside, f"agents/topologies loaded driver modules: {outside}"
