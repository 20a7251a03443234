"""Host memory of an offline regrow (tools/regrow.py under torchrun, 2 CPU ranks, gloo)."""

from __future__ import annotations

import json
import os

from conftest import REPO, torchrun

PLAN = """name: rss
data: {{prefix: {prefix}}}
defaults: {{steps: 1, save_every: 1, log_every: 1}}
stages:
  - name: a
    model: {{flavour: gpt2, n_layers: 6, d_model: 768, n_heads: 12, vocab_size: 4096, seq_len: 64}}
    layout: {{tp: 1, dp: 2, zero_stage: 2, micro_batch: 1}}
{second}"""
SECOND = {
    "tp2": """  - name: tp2
    model: {flavour: gpt2, n_layers: 6, d_model: 768, n_heads: 12, vocab_size: 4096, seq_len: 64}
    layout: {tp: 2, dp: 1, zero_stage: 1, micro_batch: 1}
""",
    "deep": """  - name: deep
    model: {flavour: gpt2, n_layers: 12, d_model: 768, n_heads: 12, vocab_size: 4096, seq_len: 64}
    layout: {tp: 1, dp: 2, zero_stage: 1, micro_batch: 1}
    grow: depth
""",
}
LARGEST = 4 * 4096 * 768  # the token embedding, fp32 bytes
SLACK = 64 << 20  # the allocator's retained pages, gloo's staging, the pickled records, the CRC buffers


def test_regrow_rss_growth_is_independent_of_the_state_size(data_prefix, tmp_path):
    """Property: a 45M-parameter GPT-2 (DP=2 ZeRO-2 source, fp32) regrown into TP=2 ZeRO-1 (column boxes of
    every matrix: the pages read are twice the bytes wanted) and into depth x2 at DP=2 ZeRO-1 (DP rank 0
    gathers the module weights): each rank's peak RSS above its RSS at the start of its part (imports and the
    source's metadata loaded) stays below 4 x the largest tensor + 64 MiB (112 MiB), whatever the size of
    its state (one fp32 state of its partition is 87 and 168 MiB here), and below half of the bytes it writes.
    The master and moments are written into the optimizer file fragment by fragment, straight from the
    growth map; the module file chunk by chunk, read back from it; the source pages a fragment touched
    leave the rank after it. Before, a rank held all three states and every source page it had read
    (about 5 x one state's bytes at TP=2)."""
    plans = {}
    for stage, text in SECOND.items():
        plans[stage] = tmp_path / f"plan_{stage}.yaml"
        plans[stage].write_text(PLAN.format(prefix=data_prefix, second=text))
    r = torchrun(2, ["-m", "megagrow.cli", "train", str(plans["tp2"]), "--stage", "a", "--run-dir", str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr[-3000:]
    src = str(tmp_path / "run" / "a" / "checkpoints")
    for stage, plan in plans.items():
        out = tmp_path / f"out_{stage}"
        args = [
            os.path.join(REPO, "tools", "regrow.py"),
            "--src",
            src,
            "--plan",
            str(plan),
            "--to-stage",
            stage,
            "--out",
            str(out),
            "--json",
        ]
        r = torchrun(2, args)
        assert r.returncode == 0, r.stderr[-3000:]
        s = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][0])
        written = {f: os.path.getsize(os.path.join(out, s["tag"], f)) for f in os.listdir(out / s["tag"]) if f.endswith(".pt")}
        for rank, (growth, state) in enumerate(zip(s["rss_growth_bytes_per_rank"], s["state_bytes_per_rank"])):
            t, d = rank % s["layout"]["tp"], rank // s["layout"]["tp"]
            mine = sum(
                n
                for f, n in written.items()
                if f"zero_pp_rank_{d}_mp_rank_{t:02d}_" in f or (d == 0 and f == f"mp_rank_{t:02d}_model_states.pt")
            )
            one_state = state // 3
            assert one_state > 80e6, (stage, s)
            bound = 4 * LARGEST + SLACK
            print(
                f"{stage} rank {rank}: RSS growth {growth / 2**20:.0f} MiB, one state {one_state / 2**20:.0f} MiB, "
                f"bound {bound / 2**20:.0f} MiB, written {mine / 2**20:.0f} MiB"
            )
            assert 0 < growth < bound, (stage, rank, growth, bound)
            assert growth < mine / 2, (stage, rank, growth, mine)
