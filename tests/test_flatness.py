"""Local energy and local entropy (Pittorino et al. 2021): closed forms on quadratics, restoring
the weights, and the BYOL flatness job on a tiny run."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_suite.analysis.flatness import (_loo_knn_error, flatness_job, local_energy,
                                         local_entropy, local_entropy_sgld, noise_parameters)
from ssl_suite.analysis.small_tasks import small_cnn
from ssl_suite.engine.pretrain import pretrain

from helpers import tiny_config


class Quadratic(nn.Module):
    """L(w) = offset + 0.5 (w - c)^T A (w - c), float64."""

    def __init__(self, A, c, w, offset=0.0):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.register_buffer("A", A)
        self.register_buffer("c", c)
        self.offset = offset

    def forward(self):
        d = self.w - self.c
        return self.offset + 0.5 * d @ self.A @ d


def spd(d, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(lo, hi, d, dtype=torch.float64)) @ q.T


def cnn_and_data():
    torch.manual_seed(0)
    model = small_cnn(width=4)
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 10, (48,))
    with torch.no_grad():               # non-trivial running statistics
        model.train()
        model(x * 2 + 0.5)

    def fn(m):
        logits = m(x)
        return {"loss": F.cross_entropy(logits, y), "error": (logits.argmax(1) != y).float().mean()}
    return model, fn


def test_sigma_zero_gives_the_unperturbed_value_in_eval_mode():
    model, fn = cnn_and_data()
    model.train()
    curve = local_energy(model, fn, [0.0, 0.05], samples=3, seed=1)
    model.eval()
    with torch.no_grad():
        ref = {k: float(v) for k, v in fn(model).items()}
    assert curve.mean["loss"][0] == ref["loss"] and curve.base["loss"] == ref["loss"]
    assert curve.mean["error"][0] == ref["error"] and curve.std["loss"][0] == 0.0
    assert curve.delta("loss")[0] == 0.0 and curve.mean["loss"][1] != ref["loss"]
    # in train mode the value differs (batch statistics): eval mode was really used
    model.train()
    with torch.no_grad():
        assert float(fn(model)["loss"]) != ref["loss"]


@pytest.mark.parametrize("bn", ["eval", "batch"])
def test_weights_buffers_and_modes_restored_bit_exactly(bn):
    model, fn = cnn_and_data()
    model.train()
    model[1].eval()                                   # a mixed mode must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    local_energy(model, fn, [0.0, 0.1, 0.5], samples=2, bn=bn)
    local_entropy(model, lambda m: fn(m)["loss"], [10.0], samples=3, bn=bn)
    local_entropy_sgld(model, lambda m: fn(m)["loss"], [10.0, 20.0], steps=3, burn_in=1,
                       anchor_samples=2, bn=bn)
    calls = {"n": 0}

    def failing(m):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return fn(m)["loss"]
    with pytest.raises(RuntimeError, match="boom"):
        local_energy(model, failing, [0.3], samples=5, bn=bn)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes


def test_quadratic_multiplicative_noise_matches_closed_form():
    d = 12
    A = spd(d, 0.2, 5.0, seed=0)
    c = torch.linspace(-3.0, 3.0, d, dtype=torch.float64) ** 3 / 5   # magnitudes 0.0x to 5
    model = Quadratic(A, c, c)                                       # at the minimum
    sigmas = [0.01, 0.1]
    n = 2000
    curve = local_energy(model, lambda m: m(), sigmas, samples=n, seed=3)
    mult = [0.5 * s ** 2 * float((torch.diag(A) * c ** 2).sum()) for s in sigmas]
    add = [0.5 * s ** 2 * float(torch.trace(A)) for s in sigmas]
    for got, se, want, other in zip(curve.delta(), curve.stderr(), mult, add):
        assert abs(got - want) < 4 * se and abs(got - want) < 0.06 * want
        assert abs(got - other) > 10 * se        # additive noise would be told apart
    addc = local_energy(model, lambda m: m(), sigmas, samples=n, seed=3, noise="additive")
    for got, se, want in zip(addc.delta(), addc.stderr(), add):
        assert abs(got - want) < 4 * se
    assert torch.equal(model.w.detach(), c)


def test_sharper_quadratic_has_larger_local_energy():
    A = spd(6, 0.5, 2.0, seed=1)
    c = torch.linspace(1.0, 2.0, 6, dtype=torch.float64)
    flat = local_energy(Quadratic(A, c, c), lambda m: m(), [0.02, 0.1], samples=50, seed=0)
    sharp = local_energy(Quadratic(3 * A, c, c), lambda m: m(), [0.02, 0.1], samples=50, seed=0)
    for f, s in zip(flat.delta(), sharp.delta()):
        assert s > f > 0
        assert s == pytest.approx(3 * f, rel=1e-9)   # same noise draws: exactly 3x


def phi_closed_form(A, u, gamma, beta, offset=0.0):
    """log E_{eps ~ N(0, I/(beta gamma))} exp(-beta (offset + 0.5 (u+eps)^T A (u+eps)))."""
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    logdet = torch.logdet(eye + A / gamma)
    quad = u @ torch.linalg.solve(A + gamma * eye, A @ u)
    return float(-beta * offset - 0.5 * logdet - 0.5 * beta * gamma * quad)


def test_local_entropy_gaussian_matches_closed_form():
    A = spd(3, 0.5, 3.0, seed=2)
    c = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    u = torch.tensor([0.2, 0.1, -0.3], dtype=torch.float64)
    beta, gammas = 2.0, [1.0, 4.0]
    model = Quadratic(A, c, c + u, offset=0.7)
    est = local_entropy(model, lambda m: m(), gammas, beta=beta, samples=5000, seed=0)
    assert est.loss == pytest.approx(float(model().detach()))
    for g, phi, se in zip(gammas, est.phi, est.stderr):
        want = phi_closed_form(A, u, g, beta, offset=0.7)
        assert abs(phi - want) < 4 * se + 1e-3 and abs(phi - want) < 0.05
    # F itself = Phi + (d/2) log(2 pi / (beta gamma))
    assert est.free_entropy()[0] == pytest.approx(est.phi[0] + 1.5 * math.log(2 * math.pi / 2.0))
    assert torch.equal(model.w.detach(), c + u)


def test_local_entropy_sgld_matches_closed_form_and_ranks_width():
    d, beta = 20, 2.0
    A = spd(d, 0.5, 2.0, seed=4)
    c = torch.zeros(d, dtype=torch.float64)
    u = torch.full((d,), 0.1, dtype=torch.float64)
    gammas = [0.5 * 2 ** k for k in range(6)]              # 0.5 .. 16
    model = Quadratic(A, c, c + u)
    est = local_entropy_sgld(model, lambda m: m(), gammas, beta=beta, steps=300, burn_in=50,
                             lr=0.015, seed=0, anchor_samples=1000)
    want = [phi_closed_form(A, u, g, beta) for g in gammas]   # -12.2 .. -1.0
    for got, w in zip(est.phi, want):
        assert abs(got - w) < 0.08 * abs(w) + 0.1
    assert est.phi[0] < est.phi[-1] < 0                     # less entropy at a small gamma
    assert torch.equal(model.w.detach(), c + u)
    wide = local_entropy_sgld(Quadratic(A / 4, c, c + u), lambda m: m(), gammas[:2], beta=beta,
                              steps=300, burn_in=50, lr=0.015, seed=0, anchor_samples=500)
    assert wide.phi[0] > est.phi[0] + 3                     # a wider minimum: more entropy


def test_noise_parameters_excludes_norm_layers():
    model = small_cnn(width=4)
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                 for p in m.parameters()}
    assert len(noise_parameters(model)) == len(list(model.parameters()))
    kept = noise_parameters(model, exclude_norm_params=True)
    assert len(kept) == len(list(model.parameters())) - len(bn_params)
    assert not any(id(p) in bn_params for p in kept)


def test_leave_one_out_knn_error_by_hand():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]]), dim=1)
    assert _loo_knn_error(feats, torch.tensor([0, 0, 1, 1]), 2, k=1, temperature=0.1) == 0.0
    assert _loo_knn_error(feats, torch.tensor([0, 1, 1, 1]), 2, k=1, temperature=0.1) == 0.5


@pytest.mark.parametrize("kwargs, match", [
    ({"sigmas": (-0.1,)}, "sigmas"), ({"sigmas": ()}, "sigmas"), ({"samples": 0}, "samples"),
    ({"batch_size": 0}, "batch_size"), ({"bn": "train"}, "bn"),
])
def test_local_energy_and_job_reject_bad_input(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flatness_job(str(tmp_path), **kwargs)
    if "sigmas" in kwargs or "samples" in kwargs:
        model, fn = cnn_and_data()
        args = {"sigmas": [0.1], "samples": 2, **kwargs}
        with pytest.raises(ValueError, match=match):
            local_energy(model, fn, args["sigmas"], args["samples"])


def test_flatness_job_rejects_missing_run(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        flatness_job(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not a run directory"):
        flatness_job(str(tmp_path))


def test_flatness_job_writes_csv_and_png(tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_config(run, **{"train.max_steps": 2}))
    kw = dict(sigmas=(0.05, 0.2), samples=2, batch_size=32, num_batches=2, progress=False)
    res = flatness_job(str(run), **kw)
    csv_path, png_path = run / "analysis" / "flatness.csv", run / "analysis" / "flatness.png"
    assert res["csv"] == str(csv_path) and res["png"] == str(png_path)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["metric"], float(r["sigma"])) for r in rows] == [
        (m, s) for m in ("byol_loss", "knn_train_error") for s in (0.0, 0.05, 0.2)]
    assert res["sigmas"] == [0.0, 0.05, 0.2] and res["step"] == 2 and res["num_images"] == 64
    loss = res["metrics"]["byol_loss"]
    assert [float(r["mean"]) for r in rows[:3]] == pytest.approx(loss["mean"], rel=1e-12)
    assert loss["delta"][0] == 0.0 and 0.0 <= loss["base"] <= 8.0
    assert loss["mean"][2] != loss["base"]                  # the noise reaches the loss
    err = res["metrics"]["knn_train_error"]
    assert all(0.0 <= v <= 1.0 for v in err["mean"])
    # deterministic: views and noise drawn from the seed
    again = flatness_job(str(run), out=str(tmp_path / "again"), **kw)
    assert again["metrics"] == res["metrics"]
    assert (tmp_path / "again" / "flatness.csv").is_file()
