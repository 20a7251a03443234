"""The operator base class and the helpers every operator uses: copy a whole tensor, build the
grown config, check a growth factor. Identity (pure resharding) is the simplest operator."""

from __future__ import annotations

from dataclasses import dataclass

from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.growth.maps import Copy, TensorMap, full_box
from megagrow.params import logical_tensors, rule

# ---------------------------------------------------------------------------------------
# the logical tensors of a config: megagrow.params' table (the model's parameter names)


def is_output_proj(rel: str) -> bool:
    """Part of an output projection onto the residual stream (attn.o, mlp.fc2, mlp.down)."""
    return rule(rel).output


def _copy_all(name: str, shape: tuple, src: str | None = None, m: float = 1.0, v: float = 1.0) -> TensorMap:
    b = full_box(shape)
    return TensorMap(name, tuple(shape), (Copy(b, src or name, b, 1.0, m, v),))


def _cfg(old: ModelConfig, **kw) -> ModelConfig:
    try:
        return old.replace(**kw)
    except UserError as e:
        raise UserError(f"the grown model config is invalid: {e}") from None


# ---------------------------------------------------------------------------------------
# operators


class Operator:
    """Base: `new_config(old)` (raises UserError on a violated precondition) and
    `tensors(old, new)` -> {new name: TensorMap}."""

    name = "operator"
    exact = True  # loss preserving at the moment of growth
    paper_c: float | None = None  # the paper's S_small / S_big constant for this operator

    def new_config(self, old: ModelConfig) -> ModelConfig:
        raise NotImplementedError

    def tensors(self, old: ModelConfig, new: ModelConfig) -> dict[str, TensorMap]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"op": self.name, **{k: v for k, v in vars(self).items()}}


def _need_factor(k, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise UserError(f"{what} growth factor must be an integer >= 2, got {k!r}")
    return k


@dataclass(frozen=True)
class Identity(Operator):
    """No change of model (pure resharding): every tensor and moment copied."""

    name = "identity"

    def new_config(self, old):
        return old

    def tensors(self, old, new):
        return {n: _copy_all(n, s) for n, s in logical_tensors(old).items()}


def _is_unit_tensor(name: str) -> bool:
    """A block tensor indexed by units (heads' q/k/v rows, MLP neurons) on one side: the unit-
    reading matrices and their biases, and the output projections (not their biases, which live
    on the residual stream)."""
    if not name.startswith("blocks."):
        return False
    r = rule(name)
    return r.split == 0 or (r.output and name.endswith(".weight"))
