"""megagrow.params, the one table of parameter facts, pinned to the model megagrow.model.gpt builds;
and the model's initial weights, drawn from that table."""

from __future__ import annotations

import math

import pytest
import torch

from megagrow import params
from megagrow.config import Layout, ModelConfig
from megagrow.schedule.law import non_embedding_params

CONFIGS = {
    "gpt2-tied": ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=300, seq_len=16),
    "gpt2-untied-dff-headdim": ModelConfig(
        n_layers=3, d_model=48, n_heads=4, head_dim=16, d_ff=200, vocab_size=130, seq_len=8, tie_embeddings=False
    ),
    "llama-tied": ModelConfig(flavour="llama", n_layers=2, d_model=64, n_heads=4, vocab_size=300, seq_len=16),
    "llama-untied-gqa": ModelConfig(
        flavour="llama", n_layers=1, d_model=64, n_heads=8, n_kv_heads=2, vocab_size=512, seq_len=16, tie_embeddings=False
    ),
    "llama-mqa": ModelConfig(flavour="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=1, vocab_size=100, seq_len=8),
}


@pytest.fixture(scope="module")
def built():
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    return {k: build_model(c, seed=11) for k, c in CONFIGS.items()}


def _megatron_split(module: torch.nn.Module, leaf: str):
    """The TP split the layer class implies: Column/VocabParallel split dim 0 (weight and bias), RowParallel
    splits its weight's dim 1 and replicates its bias; everything else is replicated."""
    from megatron.core import tensor_parallel as T

    if isinstance(module, (T.ColumnParallelLinear, T.VocabParallelEmbedding)):
        return 0
    if isinstance(module, T.RowParallelLinear):
        return 1 if leaf == "weight" else None
    return None


@pytest.mark.parametrize("key", list(CONFIGS))
def test_table_is_the_built_model(built, key):
    """For gpt2 and llama (tied/untied head, d_ff and head_dim set, grouped-query and multi-query attention):
    the table's names, order and shapes == the model's named_parameters(); num_params() == the sum of their
    numel (and embeddings=False == that sum without tok_emb / pos_emb / lm_head); every tensor's split == the
    one its megatron layer class implies and the one megatron's attributes on the parameter carry."""
    c, model = CONFIGS[key], built[key]
    named = list(model.named_parameters())
    assert [(n, tuple(p.shape)) for n, p in named] == list(params.logical_tensors(c).items())
    assert c.num_params() == sum(p.numel() for _, p in named)
    assert c.num_params(embeddings=False) == sum(p.numel() for n, p in named if not n.startswith(("tok_emb.", "pos_emb.", "lm_head.")))
    modules = dict(model.named_modules())
    for n, p in named:
        owner, leaf = n.rsplit(".", 1)
        attr = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert params.partition_dim(n) == _megatron_split(modules[owner], leaf) == attr, n


def test_kaplan_count_is_the_gpt2_table_without_biases_and_norms():
    """Kaplan's 12 L d^2 (the planner's sizes and the reference peak-LR rule) == the table's non-embedding
    count of a GPT-2 model (d_ff = 4d) minus its biases and norms, 13 L d + 2 d, exactly."""
    for L, d, h in ((12, 768, 12), (24, 1024, 16), (3, 64, 4)):
        c = ModelConfig(n_layers=L, d_model=d, n_heads=h)
        assert non_embedding_params(L, d) == params.kaplan_params(L, d) == c.num_params(embeddings=False) - 13 * L * d - 2 * d


def test_initial_weights_follow_the_table(built):
    """Each parameter is its own logical tensor's draw (init_logical, a function of seed and name only);
    biases 0, norm gains 1; matrices N(0, init_std), output projections N(0, init_std / sqrt(2 L)) (sample std
    within 3%); two tensors, two seeds: different draws."""
    from megagrow.model.gpt import build_model, init_logical

    c, model = CONFIGS["gpt2-untied-dff-headdim"], built["gpt2-untied-dff-headdim"]
    for n, p in model.named_parameters():
        assert torch.equal(p, init_logical(n, tuple(p.shape), c, 11)), n
        init = params.rule(n).init
        if init == "zeros":
            assert torch.count_nonzero(p) == 0, n
        elif init == "ones":
            assert torch.all(p == 1), n
        else:
            want = c.init_std / math.sqrt(2 * c.n_layers) if n.endswith(("attn.o.weight", "mlp.fc2.weight")) else c.init_std
            assert abs(p.std().item() / want - 1) < 0.03 and abs(p.mean().item()) < 0.1 * want, n
    q0, q1 = model.blocks[0].attn.q.weight, model.blocks[1].attn.q.weight
    assert not torch.equal(q0, q1)
    assert not torch.equal(build_model(c, seed=12).blocks[0].attn.q.weight, q0)
