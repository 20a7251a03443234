"""The loss (megagrow/model/loss.py) at TP=1: the padded vocabulary rows never take probability,
the chunked cross entropy equals the plain one (values and gradients) and needs less memory, the
loss of an imported transformers GPT-2 equals transformers' own. TP=2: tests/dist/test_loss_tp.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megagrow.config import Layout, ModelConfig
from megagrow.model.loss import linear_cross_entropy, reference_loss

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def tp1():
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())


def _model(c: ModelConfig):
    from megagrow.model.gpt import build_model

    return build_model(c, 0)


@torch.no_grad()
def make_real_logits_negative(model, shift: float = 30.0) -> None:
    """As after importing a model whose real logits are << 0 (gpt2 flavour): the padded head rows
    zero (their logits 0), every real logit about -shift (ln_f outputs its bias 10 u; each real
    head row gets -shift/10 u added)."""
    c = model.config
    u = torch.nn.functional.normalize(torch.randn(c.d_model, generator=torch.Generator().manual_seed(1)), dim=0)
    model.ln_f.weight.mul_(0.01)
    model.ln_f.bias.copy_(10 * u)
    w = model.head_weight()
    w[c.vocab_size :] = 0
    w[: c.vocab_size] += -(shift / 10) * u


def _batch(c: ModelConfig, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c.vocab_size, (b, c.seq_len), generator=g), torch.randint(0, c.vocab_size, (b, c.seq_len), generator=g)


@pytest.mark.parametrize("tie", [True, False])
def test_padded_rows_never_take_probability(tie):
    """Real logits ~ -30, padded rows' logits 0: the loss equals cross entropy over the real-vocabulary
    logits only (1e-5), where the unmasked softmax would put ~all probability on the 84 padding rows."""
    c = ModelConfig(flavour="gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=300, seq_len=16, tie_embeddings=tie)
    model = _model(c)
    make_real_logits_negative(model)
    x, y = _batch(c)
    with torch.no_grad():
        logits = model.logits(x)
        assert logits[..., : c.vocab_size].max() < -20 and logits[..., c.vocab_size :].abs().max() == 0
        ref = reference_loss(logits, y, c.vocab_size).item()
        unmasked = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        got = model(x, y).item()  # eval path (no gradients)
    train = model(x, y)  # training path (gradients made in the forward)
    assert abs(got - ref) < 1e-5 and abs(train.item() - ref) < 1e-5, (got, train.item(), ref)
    assert unmasked - ref > 20  # what the padding would have taken
    train.backward()
    assert model.head_weight().grad[c.vocab_size :].abs().max() == 0  # no gradient reaches a padded row


def test_no_op_when_the_vocabulary_needs_no_padding():
    """vocab_size a multiple of 128: no column is masked; the loss is the plain cross entropy of all logits."""
    c = ModelConfig(flavour="llama", n_layers=2, d_model=32, n_heads=4, vocab_size=256, seq_len=16)
    assert c.padded_vocab == c.vocab_size
    model = _model(c)
    x, y = _batch(c)
    with torch.no_grad():
        plain = F.cross_entropy(model.logits(x).flatten(0, 1), y.flatten()).item()
        assert abs(model(x, y).item() - plain) < 1e-6


def _grads(model, loss) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("flavour,tie,kv", [("gpt2", True, None), ("llama", False, None), ("llama", True, 2)])
def test_chunked_loss_equals_the_plain_one(flavour, tie, kv):
    """The model's chunked loss (12 chunks of 4 tokens here) == the plain form (fp32 logits of the whole
    batch, real vocabulary, F.cross_entropy): loss and every parameter's gradient within 1e-6 relative
    (a gradient that is 0 in exact arithmetic, the key biases', within 1e-9 of the largest)."""
    c = ModelConfig(flavour=flavour, n_layers=2, d_model=32, n_heads=4, vocab_size=300, seq_len=16, tie_embeddings=tie, n_kv_heads=kv)
    model = _model(c)
    x, y = _batch(c)
    plain = reference_loss(model.logits(x), y, c.vocab_size)
    g_plain = _grads(model, plain)
    chunked = model(x, y)
    g_chunked = _grads(model, chunked)
    assert abs(chunked.item() - plain.item()) <= 1e-6 * abs(plain.item())
    top = max(g.norm() for g in g_plain.values())
    for n, g in g_plain.items():  # relative to the tensor's own gradient, or to the largest one where it is ~0
        err = ((g_chunked[n] - g).norm() / torch.maximum(g.norm(), 1e-3 * top)).item()  # (key biases: exactly 0 in math)
        assert err <= 1e-6, (n, err)


@pytest.mark.parametrize("chunk", [1, 7, 48, 1000])
def test_linear_cross_entropy_any_chunk(chunk):
    """Every chunk size (one token, not dividing the batch, one chunk, larger than the batch) gives the
    plain loss and gradients; the incoming gradient scales them (a loss scaled by 1/grad_accum)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 16, generator=g, requires_grad=True)
    w = torch.randn(256, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 200, (48,), generator=g)
    (reference_loss(x @ w.t(), y, 200) * 0.25).backward()
    ref = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    loss = linear_cross_entropy(x, w, y, 200, chunk=chunk)
    (loss * 0.25).backward()
    assert abs(loss.item() - reference_loss(x @ w.t(), y, 200).item()) < 1e-5
    for a, b in zip(ref, (x.grad, w.grad)):
        assert ((a - b).norm() / a.norm()).item() < 1e-6


def test_imported_transformers_gpt2_loss_equals_transformers(tmp_path):
    """A transformers GPT-2 of vocab 4,100 (random weights, built here: no download) whose real logits are
    strongly negative, imported through megagrow.hf (saved, read back by HFCheckpoint, padded to 4,224
    rows): megagrow's loss equals transformers' loss on the same tokens within 1e-5."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from megagrow.hf import HFCheckpoint
    from megagrow.model.gpt import GPT

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=4100, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # real logits << 0: ln_f outputs ~10 u, every token row has -3 u added
        u = F.normalize(torch.randn(64), dim=0)
        hf.transformer.ln_f.weight.mul_(0.01)
        hf.transformer.ln_f.bias.copy_(10 * u)
        hf.transformer.wte.weight.add_(-3 * u)
    hf.save_pretrained(tmp_path)
    ck = HFCheckpoint(str(tmp_path))
    fields = {k: v for k, v in ck.fields.items() if not k.startswith("_")}
    c = ModelConfig(**fields, seq_len=32)
    assert c.padded_vocab == 4224
    model = GPT(c)
    model.load_state_dict(ck.tensors_for(c))
    model.eval()
    x = torch.randint(0, 4100, (2, 33), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = hf(x[:, :-1])
        assert out.logits.max() < -10
        theirs = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()).item()
        assert abs(hf(x, labels=x).loss.item() - theirs) < 1e-5  # transformers' own shifted loss
        mine = model(x[:, :-1], x[:, 1:]).item()
        logits = model.logits(x[:, :-1])
        assert (logits[..., :4100] - out.logits).abs().max() < 1e-4
    assert abs(mine - theirs) < 1e-5, (mine, theirs)


# ---------------------------------------------------------------------------------------------
# peak memory: each form measured in its own process (ru_maxrss is a high-water mark)

MEM_SHAPE = dict(tokens=2048, d_model=256, vocab=50304)


def _peak_rss_mb(form: str) -> dict:
    """Peak RSS over a forward + backward of the loss, above the RSS with inputs and weights allocated
    (an upper bound: the peak may be the imports' one)."""
    import resource

    n, d, v = MEM_SHAPE["tokens"], MEM_SHAPE["d_model"], MEM_SHAPE["vocab"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g).mul_(0.02).requires_grad_()
    y = torch.randint(0, v - 47, (n,), generator=g)
    with open("/proc/self/statm") as f:  # the RSS now (ru_maxrss would also hold the imports' high-water mark)
        base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    if form == "plain":
        loss = reference_loss(x @ w.t(), y, v - 47)
    else:
        loss = linear_cross_entropy(x, w, y, v - 47)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"form": form, "loss": loss.item(), "extra_peak_mb": peak - base, "fp32_logits_mb": n * v * 4 / 2**20}


def test_chunked_loss_peak_memory_is_lower():
    """fp32, 2,048 tokens x vocab 50,304 (logits: 393 MiB): the chunked loss's extra peak RSS over a
    forward + backward is far below the plain form's (numbers printed; the equality of values above)."""
    res = {}
    for form in ("plain", "chunked"):
        r = subprocess.run(
            [sys.executable, os.path.abspath(__file__), form],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"},
        )
        assert r.returncode == 0, r.stderr[-3000:]
        res[form] = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(res))
    assert abs(res["plain"]["loss"] - res["chunked"]["loss"]) < 1e-4
    assert res["chunked"]["extra_peak_mb"] < 0.5 * res["plain"]["extra_peak_mb"], res


if __name__ == "__main__":
    print(json.dumps(_peak_rss_mb(sys.argv[1])))
