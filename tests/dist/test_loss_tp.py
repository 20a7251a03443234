"""The loss at TP=2 (megagrow/model/loss.py's vocab-parallel path): padded columns masked on each rank's
vocabulary shard, one chunk of tokens in fp32 at a time, equal to TP=1's chunked loss."""

from __future__ import annotations

from conftest import run_worker


def test_tp2_loss_masks_the_padded_vocabulary(data_prefix, tmp_path):
    """One launch, 2 ranks: for every case the TP=2 loss (training and eval paths) equals cross entropy over
    the gathered real-vocabulary logits and TP=1's loss within 1e-5, gradients within 1e-6; with the real
    logits ~ -30 the unmasked softmax would be off by > 20 nats (vocab 50: rank 1's shard is all padding);
    no gradient reaches a padded row; at vocab 256 (no padding) masked == unmasked."""
    res = run_worker(2, "loss_tp", data_prefix, tmp_path)
    assert set(res) == {"gpt2-v300", "gpt2-v50", "llama-v300", "llama-v256"}
    for key, r in res.items():
        for k in ("loss_tp1", "loss_tp2", "loss_tp2_eval"):
            assert abs(r[k] - r["reference"]) < 1e-5, (key, k, r)
        assert r["max_grad_abs_diff"] < 1e-6 and r["max_grad_abs"] > 1e-3, (key, r)
        assert r["padded_row_grad_max"] == 0.0, (key, r)
    for key in ("gpt2-v300", "gpt2-v50"):
        assert res[key]["real_logit_max"] < -20 and res[key]["unmasked"] - res[key]["reference"] > 20, res[key]
    assert abs(res["llama-v256"]["unmasked"] - res["llama-v256"]["reference"]) < 1e-6
