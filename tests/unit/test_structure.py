"""The rooms of the package and the direction of their imports (docs/design.md).

Every module's imports of megagrow modules (top level and inside functions alike) must point
from a room to a room of a lower rank, or stay inside the room: config <- model <- parallel <-
growth/state <- train <- controller, with leaves (errors, paths, ...) below everything. A new
room must be placed in RANK, which is the point: where it sits is a decision, not an accident.
"""

from __future__ import annotations

import ast
import os

from conftest import REPO

# rank of each room (a top-level module or a subpackage of megagrow); imports go to lower or equal ranks
RANK = {
    "megagrow": 0, "errors": 0, "fsutil": 0, "paths": 0, "signals": 0, "nocompile": 0, "faults": 0, "params": 0, "rng": 0,
    "config": 1,
    "model": 2, "data": 2, "schedule": 2,
    "parallel": 3, "metrics": 3, "procs": 3,
    "growth": 4,
    "state": 5,
    "hf": 6, "train": 6,
    "controller": 7,
    "bench": 8, "regrow_cli": 8, "plan_cli": 8, "export_cli": 8, "results": 8, "cli": 9,
}


def _imports(path: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "megagrow":
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "megagrow")
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "megagrow"


def _modules():
    pkg = os.path.join(REPO, "megagrow")
    for root, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path


def test_every_room_has_a_rank():
    """Each top-level module and subpackage of megagrow is placed in the layering table."""
    rooms = {_room(m) for m, _ in _modules()}
    assert rooms - set(RANK) == set(), f"place these rooms in RANK: {sorted(rooms - set(RANK))}"


def test_imports_point_down_the_layers():
    """No module imports a room of a higher rank (so no cycles between rooms)."""
    bad = []
    for mod, path in _modules():
        r = RANK.get(_room(mod), 0)
        for imp in _imports(path):
            if _room(imp) != _room(mod) and RANK.get(_room(imp), 99) > r:
                bad.append(f"{mod} -> {imp}")
    assert bad == [], "imports against the layering: " + ", ".join(sorted(bad))


def test_controller_does_not_import_torch():
    """The controller only reads files and launches processes: importing it must not load torch."""
    import subprocess
    import sys

    code = "import sys, megagrow.controller, megagrow.cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_reading_a_checkpoint_does_not_import_megatron():
    """Checkpoint reading and the regrow executor need the parameter table, not the model's layers:
    importing them must not load megatron-core (seconds of start-up on every regrow rank)."""
    import subprocess
    import sys

    code = ("import sys, megagrow.state.checkpoint, megagrow.state.executor, megagrow.state.manifest; "
            "print(any(m.split('.')[0] == 'megatron' for m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
