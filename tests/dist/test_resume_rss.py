"""Host memory of a resume through the shard reader, measured by bench/resume_rss.py (2 CPU ranks, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, _env

SLACK = 32 << 20  # the allocator's retained pages, gloo's bounded all-gather staging (2 x dp x 2^18 x 4 B), the record


def test_shard_reader_resume_rss_growth_is_bounded_by_own_shard(tmp_path):
    """Property: at ZeRO-1 and ZeRO-3 (DP=2, fp32, a 17.6M-parameter GPT-2: each rank's optimizer file 105 MB,
    the largest tensor 6 MB), the RSS a rank's shard-reader resume adds to its built engine (peak, kernel
    high-water mark) stays below its own shard's bytes (its optimizer file: fp32 master + 2 moments) + 2 x the
    largest tensor + 32 MiB. A resume that kept its whole optimizer file mapped while filling (20 B per
    element: 167 MB) or also read the module file (+67 MB) would exceed it. bench/resume_rss.py measures
    DeepSpeed's load_checkpoint too; docs/scale.md has the numbers."""
    cmd = [
        sys.executable,
        os.path.join(REPO, "bench", "resume_rss.py"),
        "--d-model",
        "384",
        "--layers",
        "9",
        "--vocab",
        "4096",
        "--zero",
        "1",
        "3",
        "--paths",
        "new",
        "--same-launch",
        "--workdir",
        str(tmp_path),
        "--json",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    for zero in ("1", "3"):
        for got in res["zero"][zero]["new"]:
            bound = got["own_shard_bytes"] + 2 * got["largest_tensor_bytes"] + SLACK
            assert got["own_shard_bytes"] > 90e6, got
            assert 0 < got["growth"] < bound, (zero, got, bound)
            print(
                f"ZeRO-{zero} rank {got['rank']}: growth {got['growth'] / 2**20:.0f} MiB, own shard "
                f"{got['own_shard_bytes'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
            )
