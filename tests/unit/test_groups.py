"""Process groups: laying out the groups again in the same process (a transition, a bench sweep, a
test that runs many layouts) must not leave the previous layout's groups behind. Each megatron-core
layout is about 17 groups, each with its own threads on gloo; before the fix a 13-case growth test
ended with 3,500 threads in each rank and a load average near 900 on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

CODE = r"""
import json, os
os.environ.setdefault("DS_ACCELERATOR", "cpu")
from megagrow.config import Layout
from megagrow.parallel.groups import _registered_groups, init_distributed
from megatron.core import parallel_state as ps
out = []
for tp in (1, 1, 1):
    init_distributed(Layout.from_dict({"tp": tp, "dp": 1, "zero_stage": 1, "micro_batch": 1}))
    ps.get_tensor_model_parallel_group().size()  # the live layout's groups work
    out.append([len(_registered_groups()), len(os.listdir("/proc/self/task"))])
print(json.dumps(out))
"""


def test_init_distributed_again_keeps_the_group_and_thread_count():
    """Three layouts in a row in one process: the number of registered process groups and of
    threads after the 2nd and 3rd equals that after the 1st (exactly), and the groups in use work."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts[0][0] > 1 and counts[1] == counts[0] and counts[2] == counts[0], counts
