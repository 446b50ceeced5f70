"""Weight rescaling, the ELR log and sphere SGD in the BYOL loop, from the config."""

import json

import torch

from ssl_suite.cli import main
from ssl_suite.engine.pretrain import pretrain
from ssl_suite.optim.wrs import WeightRescaling

from helpers import tiny_config


def test_wrs_keeps_unit_filters_and_elr_is_logged_and_plotted(tmp_path):
    run = tmp_path / "run"
    res = pretrain(tiny_config(run, **{"train.max_steps": 3, "optim.wrs": True,
                                       "train.log_elr": True, "optim.name": "momentum",
                                       "optim.base_lr": 0.05}))
    names = WeightRescaling(res.online).names
    assert len(names) == 23                     # 21 convs + the two head Linear -> BN layers
    params = dict(res.online.named_parameters())
    for n in names:
        w = params[n].detach()
        torch.testing.assert_close(w.flatten(1).norm(dim=1), torch.ones(w.shape[0]))
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "elr_median" in r]
    assert len(logged) == 3
    assert logged[0]["elr_joint"] == 0.0          # warmup from 0: step 1 has lr 0
    for r in logged[1:]:
        assert r["elr_joint"] > 0 and r["angle_joint"] > 0
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0


def test_spheresgd_from_the_config_keeps_the_invariant_weights_on_the_sphere(tmp_path):
    res = pretrain(tiny_config(tmp_path / "run", **{"train.max_steps": 3, "optim.name": "spheresgd",
                                                    "optim.base_lr": 0.01, "optim.momentum": 0.0,
                                                    "optim.lr_scaling": "none"}))
    opt_norm = torch.sqrt(sum(res.online.state_dict()[n].square().sum()
                              for n in WeightRescaling(res.online).names))
    assert torch.isfinite(torch.tensor(res.final_loss))
    assert abs(float(opt_norm) - 1.0) < 1e-4   # one joint sphere of radius 1 (the paper's code)
