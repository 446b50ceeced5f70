"""Run by test_ddp.py under ``torchrun --nproc_per_node 2``: a few BYOL steps with each optimizer
named on the command line (gloo, 2 micro-batches per step); every rank dumps its final weights."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from ssl_suite.engine import pretrain as pretrain_mod
from ssl_suite.models import build_byol

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_config  # noqa: E402

# names that are phases, not optimizers: GradMax growth after step 1 (DDP re-wrapped), SCL masks,
# GradInit before the first step (multipliers averaged over the ranks); and KOALA-M on its C
# kernels, whose predict buffer is swapped in as the weights' storage under DDP
PHASES = {"koalam_native": {"optim.name": "koalam", "optim.kwargs": {"native": True}},
          "gradmax": {"growth.enabled": "true", "growth.start_epoch": 1 / 44,
                      "growth.n_growths": 1, "growth.start_fraction": 0.5},
          "scl": {"sparsity.enabled": "true", "sparsity.weight": 0.5, "sparsity.mask_lr": 0.5},
          "gradinit": {"init.gradinit.enabled": "true", "init.gradinit.steps": 2}}

out = Path(sys.argv[1])
acc = pretrain_mod.make_accelerator()
for name in sys.argv[2:]:
    extra = PHASES.get(name, {"optim.name": name})
    cfg = tiny_config(out / name, **{"train.max_steps": 2, "train.grad_accum_steps": 2,
                                     "optim.base_lr": 0.05, **extra})
    if acc.is_main_process and name == sys.argv[2]:
        pretrain_mod._seed_all(cfg.seed)           # the same initial weights pretrain builds
        init = build_byol(cfg.model)[0]
        save_file({f"online.{k}": v.detach().contiguous() for k, v in init.state_dict().items()},
                  str(out / "init.safetensors"))
    res = pretrain_mod.pretrain(cfg, accelerator=acc)
    state = {f"online.{k}": v.detach().cpu().contiguous() for k, v in res.online.state_dict().items()}
    state["loss"] = __import__("torch").tensor(res.final_loss)
    save_file(state, str(out / f"{name}_rank{acc.process_index}.safetensors"))
