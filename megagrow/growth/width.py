"""Width growth: d_model, d_ff and the head count times k, head_dim kept (see Width)."""

from __future__ import annotations

from dataclasses import dataclass

from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.growth.base import Operator, _cfg, _is_unit_tensor, _need_factor
from megagrow.growth.maps import Copy, Fill, Noise, TensorMap, full_box
from megagrow.params import logical_tensors, rule


@dataclass(frozen=True)
class Width(Operator):
    """d_model, d_ff and n_heads times `factor` (head_dim unchanged); residual h -> [h]*k.
    Grouped-query attention: n_kv_heads times `factor` too, so the group size n_heads /
    n_kv_heads is kept; copy c's query heads then read copy c's K/V heads (exact).

    Every matrix becomes k x k blocks, W on the diagonal; embeddings, biases and in-block
    norms are repeated k times; the final norm is divided by k (tied head) or the untied
    head is [W]*k / k. `symmetry_breaking` > 0 adds seeded noise of std
    symmetry_breaking * init_std that sums to zero over each row of blocks (so the output
    is exactly unchanged, since every block of a row reads identical copies) but differs
    between rows: the backward pass is no longer symmetric and the copies diverge.
    `offdiag_moments`: "tiled" (default; the off-diagonal blocks get m/k, v/k^2 like the
    diagonal: their gradient right after growth is exactly g/k too) or "zero" (as the
    reference code).

    `new_units` "init" (grow spec `width:init`) keeps the residual copies [h]*k but makes the
    k-1 new groups of units (attention heads, MLP neurons) fresh instead of copies: their
    input rows (q, k, v, fc1 / gate, up) are seeded noise of the model's init std, their
    biases 0, and their output columns (attn.o, mlp.fc2 / down) 0, so they add nothing at
    growth (exact) yet get a gradient at once. The old units read the mean of the k copies
    (input blocks (0, c) = W / k) and every copy reads the old units (output blocks (c, 0) =
    W), so the backward pass stays symmetric over the copies: each copy's gradient is g / k
    as in the copy mode. Moments: each old input block's gradient is exactly the small
    model's g (m, v kept), the output blocks' g / k (m / k, v / k^2); fresh entries 0. No
    cancelling noise is added: the fresh units, whose input rows differ between copies, make
    the copies diverge from the first step.
    """

    factor: int = 2
    symmetry_breaking: float = 1.0
    offdiag_moments: str = "tiled"
    new_units: str = "copy"
    name = "width"

    @property
    def paper_c(self):
        return 1.776 if self.factor == 2 else None

    def new_config(self, old):
        k = _need_factor(self.factor, "width")
        if self.symmetry_breaking < 0:
            raise UserError(f"symmetry_breaking must be >= 0, got {self.symmetry_breaking}")
        if self.offdiag_moments not in ("tiled", "zero"):
            raise UserError(f"offdiag_moments must be 'tiled' or 'zero', got {self.offdiag_moments!r}")
        if self.new_units not in ("copy", "init"):
            raise UserError(f"width new_units must be 'copy' or 'init', got {self.new_units!r}")
        d_ff = k * old.ffn_dim
        kv = None if old.n_kv_heads is None else k * old.n_kv_heads  # group size kept
        new_default = old.replace(d_model=k * old.d_model, n_heads=k * old.n_heads, n_kv_heads=kv, d_ff=None)
        return _cfg(
            old,
            d_model=k * old.d_model,
            n_heads=k * old.n_heads,
            n_kv_heads=kv,
            d_ff=None if old.d_ff is None and new_default.ffn_dim == d_ff else d_ff,
        )

    def tensors(self, old, new):
        k = self.factor
        inv, inv2 = 1.0 / k, 1.0 / (k * k)
        om, ov = (inv, inv2) if self.offdiag_moments == "tiled" else (0.0, 0.0)
        std = 0.0 if self.new_units == "init" else self.symmetry_breaking * old.init_std  # fresh units break it
        tag = f"width{k}:{new.d_model}"
        out: dict[str, TensorMap] = {}
        shapes = logical_tensors(new)
        for name, s in logical_tensors(old).items():
            ns = shapes[name]
            pieces = []
            if name in ("tok_emb.weight", "pos_emb.weight"):  # (rows, d) -> (rows, k d)
                for c in range(k):
                    pieces.append(Copy(((0, s[0]), (c * s[1], (c + 1) * s[1])), name, full_box(s), 1.0, inv, inv2))
            elif name == "lm_head.weight":  # untied: [W]*k / k, its gradient stays g
                for c in range(k):
                    pieces.append(Copy(((0, s[0]), (c * s[1], (c + 1) * s[1])), name, full_box(s), inv, 1.0, 1.0))
                if std > 0:  # zero-sum over the k column blocks: +Z_j on block j, -Z_j on block j+1
                    for j in range(k - 1):
                        for c, sign in ((j, 1.0), (j + 1, -1.0)):
                            b = ((0, s[0]), (c * s[1], (c + 1) * s[1]))
                            pieces.append(Noise(b, f"{name}#{tag}/sym{j}", std, sign, add=True, key_box=b))
            elif name.startswith("ln_f."):
                if old.tie_embeddings:  # [g]*k / k: its gradient stays g, moments unscaled
                    pieces = [Copy(((c * s[0], (c + 1) * s[0]),), name, full_box(s), inv, 1.0, 1.0) for c in range(k)]
                else:  # the untied head carries the 1/k instead
                    pieces = [Copy(((c * s[0], (c + 1) * s[0]),), name, full_box(s), 1.0, inv, inv2) for c in range(k)]
            elif self.new_units == "init" and _is_unit_tensor(name):
                pieces = self._fresh_units(name, s, new, tag)
            elif len(s) == 1:  # in-block norm gains/biases and linear biases: repeated
                pieces = [Copy(((c * s[0], (c + 1) * s[0]),), name, full_box(s), 1.0, inv, inv2) for c in range(k)]
            else:  # a block matrix (out, in) -> k x k blocks
                o, i = s
                for r in range(k):
                    for c in range(k):
                        b = ((r * o, (r + 1) * o), (c * i, (c + 1) * i))
                        if r == c:
                            pieces.append(Copy(b, name, full_box(s), 1.0, inv, inv2))
                        else:
                            pieces.append(Copy(b, name, full_box(s), 0.0, om, ov))
                if std > 0:  # row r: -Z_r on block (r, r), +Z_r on block (r, r+1 mod k)
                    for r in range(k):
                        for c, sign in ((r, -1.0), ((r + 1) % k, 1.0)):
                            b = ((r * o, (r + 1) * o), (c * i, (c + 1) * i))
                            pieces.append(Noise(b, f"{name}#{tag}/sym{r}", std, sign, add=True, key_box=b))
            out[name] = TensorMap(name, ns, tuple(pieces))
        return out

    def _fresh_units(self, name: str, s: tuple, new: ModelConfig, tag: str) -> list:
        """`new_units="init"`: the pieces of a tensor that reads or writes units."""
        from megagrow.params import init_std

        k = self.factor
        full = full_box(s)
        if rule(name).output:  # (d, units) -> (k d, k units): every residual copy reads the old units
            o, i = s
            pieces = [Copy(((c * o, (c + 1) * o), (0, i)), name, full, 1.0, 1.0 / k, 1.0 / (k * k)) for c in range(k)]
            return pieces + [Fill(((0, k * o), (i, k * i)), 0.0)]
        if len(s) == 1:  # a unit bias: the old units' kept, the fresh ones 0
            return [Copy(((0, s[0]),), name, full, 1.0, 1.0, 1.0), Fill(((s[0], k * s[0]),), 0.0)]
        o, i = s  # (units, d) -> (k units, k d): old units read the mean of the copies, fresh units all of them
        fresh = ((o, k * o), (0, k * i))
        return [Copy(((0, o), (c * i, (c + 1) * i)), name, full, 1.0 / k, 1.0, 1.0) for c in range(k)] + [
            Noise(fresh, f"{name}#{tag}/fresh", init_std(new, name), key_box=fresh)
        ]
