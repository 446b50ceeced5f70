"""Run by test_ddp.py under ``torchrun --nproc_per_node 2``: a short BYOL run on gloo that
records which images each process read and dumps its final weights."""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

import ssl_suite.data.loader as loader
from ssl_suite.engine import pretrain as pretrain_mod

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_config  # noqa: E402

out = Path(sys.argv[1])
seen = []
real_local = loader.BatchPlan.local_indices


def recording_local(self, epoch, step, rank, perm=None):
    parts = real_local(self, epoch, step, rank, perm)
    seen.append({"epoch": epoch, "step": step, "rank": rank, "world": self.world,
                 "global": self.global_indices(epoch, step, perm).tolist(),
                 "local": [p.tolist() for p in parts]})
    return parts


loader.BatchPlan.local_indices = recording_local
cfg = tiny_config(out / "run", **{"train.max_steps": 3, "train.grad_accum_steps": 2,
                                  "train.sync_bn": True, "train.ddp_comm_hook": "fp16"})
acc = pretrain_mod.make_accelerator(comm_hook=cfg.train.ddp_comm_hook)
res = pretrain_mod.pretrain(cfg, accelerator=acc)
rank = acc.process_index
(out / f"seen_rank{rank}.json").write_text(json.dumps(seen))
# the final checkpoint holds the main process's weights; every rank dumps its own live copy
state = {}
for name, module in (("online", res.online), ("target", res.target)):
    for k, v in module.state_dict().items():
        state[f"{name}.{k}"] = v.detach().cpu().contiguous()
save_file(state, str(out / f"weights_rank{rank}.safetensors"))
(out / f"info_rank{rank}.json").write_text(json.dumps({"world": acc.num_processes,
                                                        "distributed_type": str(acc.distributed_type)}))
