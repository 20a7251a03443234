"""The rooms of the package and the direction of their imports (docs/design.md).

Every module's imports of megagrow modules (top level and inside functions alike) must point
from a room to a room of a strictly lower rank, or stay inside the room: config <- model <- parallel <-
growth/state <- train <- controller, with leaves (errors, paths, ...) below everything. Two rooms on
the same floor never import each other. A new room must be placed in RANK, which is the point:
where it sits is a decision, not an accident.
"""

from __future__ import annotations

import ast
import os

from conftest import REPO

# rank of each room (a top-level module or a subpackage of megagrow); imports go to lower or equal ranks
RANK = {
    "megagrow": 0,
    "errors": 0,
    "fsutil": 0,
    "paths": 0,
    "nocompile": 0,
    "faults": 0,
    "params": 0,
    "rng": 0,
    "collectives": 0,
    "memory": 0,
    "config": 1,
    "signals": 1,
    "model": 2,
    "data": 2,
    "schedule": 2,
    "parallel": 3,
    "growth": 4,
    "metrics": 4,
    "procs": 4,
    "state": 5,
    "interop": 6,
    "hf": 7,
    "train": 8,
    "controller": 9,
    "bench": 10,
    "results": 10,
    "cli": 11,
}


def _is_module(name: str) -> bool:
    """megagrow.NAME is a module or subpackage (not a name defined in megagrow/__init__.py)."""
    return os.path.isfile(os.path.join(REPO, "megagrow", name + ".py")) or os.path.isdir(os.path.join(REPO, "megagrow", name))


def _imports(path: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom) and node.module == "megagrow":  # from megagrow import faults: the room faults
            out.update(f"megagrow.{a.name}" if _is_module(a.name) else "megagrow" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "megagrow":
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


def layering_violations(modules) -> list[str]:
    """'module -> import' for each import of another room that is not on a strictly lower floor
    (an unplaced room counts as the top floor)."""
    bad = []
    for mod, imports in modules:
        r = RANK.get(_room(mod), 99)
        for imp in imports:
            if _room(imp) not in (_room(mod), "megagrow") and RANK.get(_room(imp), 99) >= r:
                bad.append(f"{mod} -> {imp}")
    return sorted(bad)


def test_the_layering_check_sees_equal_floors():
    """The check itself: an import up a floor and an import between two rooms of one floor are both
    found; an import inside a room, down a floor, or of the package root is not."""
    mods = [
        ("megagrow.model.gpt", {"megagrow.data.dataset", "megagrow.model.layers", "megagrow.config", "megagrow"}),
        ("megagrow.config", {"megagrow.parallel.groups"}),
        ("megagrow.train.loop", {"megagrow.state.record"}),
    ]
    assert layering_violations(mods) == ["megagrow.config -> megagrow.parallel.groups", "megagrow.model.gpt -> megagrow.data.dataset"]


def test_imports_point_down_the_layers():
    """No module imports a room of a higher rank or of its own rank (so no cycles between rooms, and
    the rooms of one floor stay independent of each other)."""
    bad = layering_violations((mod, _imports(path)) for mod, path in _modules())
    assert bad == [], "imports against the layering: " + ", ".join(bad)


def test_controller_does_not_import_torch():
    """The controller only reads files and launches processes: importing it must not load torch."""
    import subprocess
    import sys

    code = "import sys, megagrow.controller, megagrow.cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_reading_a_checkpoint_does_not_import_megatron():
    """Checkpoint reading and the regrow executor need the parameter table, not the model's layers:
    importing them must not load megatron-core (seconds of start-up on every regrow rank)."""
    import subprocess
    import sys

    code = (
        "import sys, megagrow.state.checkpoint, megagrow.state.executor, megagrow.state.manifest, megagrow.state.reads, "
        "megagrow.state.resume, megagrow.state.verify, megagrow.state.decision; "
        "print(any(m.split('.')[0] == 'megatron' for m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


# torch.distributed's collectives (and deepspeed.comm's, which wrap them): only megagrow/collectives.py calls them
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "send_object_list",
    "recv_object_list",
    "_all_gather_base",
    "_reduce_scatter_base",
}
_DIST_MODULES = ("torch.distributed", "deepspeed.comm")


def direct_collectives(source: str, name: str = "<src>") -> list[str]:
    """'line: call' for each torch.distributed (or deepspeed.comm) collective `source` calls itself:
    through the module path, an alias of it (import ... as, from torch import distributed, a name
    assigned from an expression that names it, or the usual `dist`), or a collective imported by name."""
    tree = ast.parse(source, name)
    aliases = {"dist", "torch_dist", "c10d"}
    direct = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(_DIST_MODULES) and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in _DIST_MODULES or full.startswith(tuple(m + "." for m in _DIST_MODULES)) and a.name not in COLLECTIVES:
                    aliases.add(a.asname or a.name)
                elif node.module.startswith(_DIST_MODULES) and a.name in COLLECTIVES:
                    direct.add(a.asname or a.name)
        elif isinstance(node, ast.Assign) and any(m in ast.unparse(node.value) for m in _DIST_MODULES):
            aliases.update(t.id for t in node.targets if isinstance(t, ast.Name))
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            base = ast.unparse(f.value)
            if base in aliases or base.endswith(_DIST_MODULES) or base.split(".")[-1] == "distributed_c10d":
                bad.append(f"{node.lineno}: {ast.unparse(f)}")
        elif isinstance(f, ast.Name) and f.id in direct:
            bad.append(f"{node.lineno}: {f.id}")
    return bad


def test_the_detector_sees_every_spelling():
    """The check below is only as good as its detector: each way of calling a collective is found."""
    src = """
import torch
import torch.distributed as D
from torch import distributed
from torch.distributed import all_gather_object as ago
import sys
d2 = sys.modules.get("torch.distributed")
torch.distributed.all_reduce(t)
D.barrier()
distributed.broadcast_object_list(b, src=0)
ago(out, x)
d2.barrier()
dist.gather_object(x, out)
torch.gather(x, 0, i)          # a tensor op, not a collective
functools.reduce(f, xs)        # neither
"""
    assert [b.split(":")[0] for b in direct_collectives(src)] == ["8", "9", "10", "11", "12", "13"], direct_collectives(src)


def test_only_the_collectives_module_calls_collectives():
    """Every collective goes through megagrow/collectives.py, which puts tensors where the backend
    needs them (NCCL: the device) and metadata on a gloo side group. A direct call elsewhere in
    megagrow/, tools/ or bench/ (a CPU tensor all-reduced on NCCL fails on the first GPU run) fails here."""
    allowed = os.path.join(REPO, "megagrow", "collectives.py")
    bad = []
    for top in ("megagrow", "tools", "bench"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                path = os.path.join(root, f)
                if f.endswith(".py") and path != allowed:
                    bad += [f"{os.path.relpath(path, REPO)}:{b}" for b in direct_collectives(open(path).read(), path)]
    assert bad == [], "call megagrow.collectives instead: " + ", ".join(bad)
