"""Third-party modules imported without running their import-time `torch.compile` decorations.

megatron-core decorates its fusions (bias-GeLU, SwiGLU, ...) with `jit_fuser`, bound to
`torch.compile` when its package is first imported, and DeepSpeed's Muon optimizer module
(imported inside every `deepspeed.initialize`) decorates its kernels with `torch.compile` too.
Each such decoration loads torch's compiler stack (torch._inductor: ~2 s of every process
start, the largest single import of a rank). megagrow calls none of those functions: it uses
megatron-core's tensor-parallel layers, its cross entropy and parallel_state, and torch's AdamW
inside DeepSpeed. So these modules are imported with `torch.compile` standing in as the
identity for the duration of their import only: the decorated functions stay plain Python
(correct, uncompiled) and `torch.compile` itself is restored at once, for user code and
everything imported later. Measure with `python -X importtime -c "import megagrow.model"`.

Every megagrow path into megatron-core goes through `megatron_core()` first (`megagrow.model`
calls it before importing the model, `megagrow.parallel.groups` before setting up the process
groups); `megagrow.parallel.engine` imports DeepSpeed's Muon module this way before
`deepspeed.initialize`.
"""

from __future__ import annotations

import importlib
import sys


def _identity_compile(model=None, **_kwargs):
    return model if model is not None else (lambda fn: fn)


def import_uncompiled(name: str):
    """Import module `name` (once per process) with `torch.compile` as the identity meanwhile."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    import torch

    real = torch.compile
    torch.compile = _identity_compile
    try:
        return importlib.import_module(name)
    finally:
        torch.compile = real


def megatron_core():
    """megatron.core, its jit_fuser bound to a plain decorator."""
    return import_uncompiled("megatron.core")


def deepspeed_muon() -> None:
    """DeepSpeed's Muon optimizer module, which deepspeed.initialize imports to check the optimizer."""
    try:
        import_uncompiled("deepspeed.runtime.zero.muon.muon_optimizer")
    except ImportError:  # a DeepSpeed without Muon
        pass
