"""Two CPU processes (torchrun + gloo + Accelerate, fp16 gradient compression through the DDP comm
hook): identical weights, split global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_process_run_splits_batch_and_agrees(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    info = [json.loads((tmp_path / f"info_rank{r}.json").read_text()) for r in range(2)]
    assert all(i["world"] == 2 and "MULTI_CPU" in i["distributed_type"] for i in info)

    # identical online and target weights (parameters and BN buffers) on both ranks
    w0, w1 = (load_file(str(tmp_path / f"weights_rank{r}.safetensors")) for r in range(2))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k

    # the global batch of each step is split between the ranks, not duplicated
    seen = [json.loads((tmp_path / f"seen_rank{r}.json").read_text()) for r in range(2)]
    steps = {(s["epoch"], s["step"]) for s in seen[0]}
    assert len(steps) == 3
    for key in steps:
        rec = [next(s for s in seen[r] if (s["epoch"], s["step"]) == key) for r in range(2)]
        assert rec[0]["global"] == rec[1]["global"] and len(rec[0]["global"]) == 32
        local = [sum(r["local"], []) for r in rec]          # 2 micro-batches of 8 per rank
        assert all(len(x) == 16 for x in local)
        assert not set(local[0]) & set(local[1])
        assert sorted(local[0] + local[1]) == sorted(rec[0]["global"])


@pytest.mark.parametrize("names", [["nsgd", "koalam", "koalam_native", "mbf", "svi_momentum"],
                                   ["gradmax", "scl", "gradinit"]])
def test_two_process_runs_with_hooked_and_closure_optimizers(tmp_path, names):
    """NSGD's input hooks, KOALA's per-sample losses (all-reduced; on the C kernels with the
    predict buffer swapped in as the weights' storage), MBF's per-sample statistics
    and SVI's replaced backward under DDP; and the phases: GradMax growth (M averaged over the
    ranks, DDP re-wrapped), SCL masks, GradInit: both ranks end with the same weights, and the
    weights moved."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_optim_worker.py"), str(tmp_path), *names]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = load_file(str(tmp_path / "init.safetensors"))
    for name in names:
        w0, w1 = (load_file(str(tmp_path / f"{name}_rank{r}.safetensors")) for r in range(2))
        assert torch.isfinite(w0["loss"]), name
        for k in w0:
            assert torch.equal(w0[k], w1[k]), (name, k)
        moved = [k for k in init if k.endswith("weight") and k in w0
                 and w0[k].dtype.is_floating_point and not torch.equal(init[k], w0[k])]
        assert len(moved) >= 3, (name, moved)
        if name == "gradmax":   # started at half width, grown back after step 1 on both ranks
            assert w0["online.encoder.layer1.0.conv1.weight"].shape[0] == 8
