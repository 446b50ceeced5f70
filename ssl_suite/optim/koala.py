"""KOALA: Kalman Optimization Algorithm with Loss Adaptivity (Davtyan, Sameni, Cerkezi, Meishvili,
Bielski, Favaro, AAAI 2022, arXiv 2107.03331), variants KOALA-V (vanilla) and KOALA-M (momentum).
Spec: ``shared/algorithms/nsgd_koala_mbf_svi.md`` section 2. Official code: ``Araachie/koala``
(``koala.py``: ``VanillaKOALA``, ``MomentumKOALA``; ``train.py``: hyper-parameters).

The weights are the state of a Kalman filter and the minibatch loss is a noisy measurement of a
target loss: ``L_target = L(x) + v``, ``v ~ N(0, R)``; linearising gives ``H = grad L(x)^T``.
Updates are **layer-wise** (one gain per parameter tensor l, gradient g_l), the covariance is one
shared scalar (V) or one 2x2 scalar pattern (M), and ``H H^T`` is approximated by the max over
layers. All scalars are float64 tensors on the parameters' device (no host syncs).

KOALA-V (supplement eqs. 31, 36)::

    predict:  P^ = P + Q                                    (Q = q, a constant)
    per layer l:
              S_l   = P^ ||G_l||^2 + R
              x_l  <- x_l - (P^ (L - L_target) / S_l) G_l
              h_l   = ||G_l||^2 / S_l
    update:   P = P^ - P^2 max_l h_l        (= R P^ / (P^ ||G_max||^2 + R), eq. 36 for one layer)

KOALA-M (supplement Algorithm 2; state x_bar = (x, v), F = [[1, 1], [0, kappa]])::

    predict (BEFORE the closure: the gradient is taken at the predicted point):
              x_avg <- b_x x_avg + (1 - b_x) x ;  q_x = ||x - x_avg||^2 / n     (eqs. 50-51)
              Q = diag(q_x, q_v)                                                 (eq. 52)
              x <- x + v ;  v <- kappa v ;  P^ = F P F^T + Q
    per layer l (gradient at x^):
              S_l = P^_00 ||G_l||^2 + R
              x_l <- x_l - (P^_00 (L - L_target) / S_l) G_l
              v_l <- v_l - (P^_10 (L - L_target) / S_l) G_l
              h_l = ||G_l||^2 / S_l
    update:   P = P^ - P^ diag(max_l h_l, 0) P^^T

Target loss (supplement Theorem 1, spec 2.4). ``target="relative"`` (default) is form (b),
``L_target = (1 - eps_k) L`` with ``eps_k = group["lr"]``, so ``L - L_target = lr * L``. This is
exactly the official code's ``lr * layer_loss`` in place of ``L - L_target``: the two coincide, and
lr = 1 (the paper's default) means a target of 0. An LR scheduler therefore schedules the target
gap; each param group uses its own lr in its gains. ``target="absolute"`` is form (a),
``L_target = L - eps_k``, i.e. ``L - L_target = lr``.

Measurement noise R (spec 2.5). ``r_mode="paper"`` (eq. 49):
``R <- b_R R + (1 - b_R) mean_i (l_i - L_target)^2`` over the closure's per-sample losses l_i, where
``L_target`` is the data-loss target of the first param group's lr (R is one shared scalar):
``mean_i (l_i - (1 - eps) L)^2 = m2 - (1 - eps^2) L^2`` (relative) or ``m2 - L^2 + eps^2``
(absolute), with ``L`` the mean and ``m2`` the mean of squares. ``r_mode="code"``: the official
code's raw second moment ``m2`` (equal to eq. 49 only for a target of 0, i.e. lr = 1).
``b_R = r_beta = 0.9`` and ``R_0 = r_init = 1.0`` are the code's ``ExpAverage(0.9, 1.0)``;
``r=<float>`` fixes R (the code's ``r`` argument). Under ``torch.distributed`` the sum, the sum of
squares and the count of the per-sample losses are all-reduced, so L and m2 are global.

Process noise Q for KOALA-M (spec 2.5). ``q_mode="paper"`` (eqs. 50-52): as above, x_avg starts
at the initial weights [RECONSTRUCTION: the paper gives no initialisation] and ``b_x = avg_beta =
0.9`` (the code's constant; the paper gives none). ``q_mode="code"``: the official estimator,
``gt`` initialised to **zeros** and updated as ``gt <- 0.9 gt + 0.1 x`` at the end of each update
(layers skipped by the skip rule are not updated), and in predict
``q_w <- EMA_{q_beta}(sqrt(sum_l ||gt_l - x_l||^2) / n)`` (a norm, not squared; ``q_beta=0.9``,
``q_w`` starts at ``qw=1e-2``). Both use ``q_v = qv = 1e-2`` (code). KOALA-V uses the constant
``q`` (default 1: ``train.py`` does not pass q, so the class default 1 is what ran).

Weight decay (not in the paper). ``wd_mode="objective"`` (default) [RECONSTRUCTION]: weight decay
is an L2 term in the measured objective, ``f = L + sum_l wd_l/2 ||x_l||^2`` (wd_l = its group's
``weight_decay``), so ``H = grad f``: both variants step along ``G_l = g_l + wd_l x_l``, use
``||G_l||`` in S_l and h_l, and the target gap is taken on f (all layers' L2 terms). This is the
paper's filter applied to the regularised loss. ``wd_mode="code"``: the official code, where the
loss of layer l carries only its own L2 term, ``L + wd_l/2 ||x_l||^2``, and KOALA-V steps along
``g_l`` (without weight decay) while KOALA-M steps along ``G_l``; both use ``||G_l||`` in S and h.
The L2 term never enters R. ``||G_l||^2`` is formed as ``||g||^2 + 2 wd <g, x> + wd^2 ||x||^2``
in float64 from float32 reductions (no copy of G), clamped at 0.

Skip rule (spec 2.4). ``skip="layer"`` (default, the code): a layer with
``||g_l|| < skip_threshold`` (1e-9, code) is not updated and does not enter the max.
``skip="iteration"`` (Alg. 2): if any layer with a gradient is below the threshold the whole
update is skipped: no weight or velocity change, ``P = P^``, R unchanged (for KOALA-M the
predict has already happened and stands).
If no layer is updated, ``max_l h_l = 0`` and ``P = P^`` (the code would fail on an empty max).

Protocol: :meth:`step` requires the closure (zero-grad, forward, backward, **return the detached
1-D per-sample loss vector**); it is called exactly once per step, after KOALA-M's predict.
Parameters without a gradient are skipped (KOALA-M still moves them by their velocity in predict).
If the closure raises, KOALA-M's weights stay at the predicted point x + v.

Defaults and their sources: ``lr=1.0`` (paper: "default learning rate of 1.0"; ``train.py``),
``sigma=0.1`` (KOALA-V ``P_0``, ``train.py``; class default 1), ``q=1.0`` (class default, used in
the experiments), ``sw=sv=0.1, sc=0`` (KOALA-M ``P_0``, ``train.py`` and class defaults),
``kappa=0.9`` (code ``a``), ``qw=qv=1e-2`` (code), ``r_beta=0.9, r_init=1.0`` (code
``ExpAverage``), ``avg_beta=q_beta=0.9`` (code), ``skip_threshold=1e-9`` (code ``eps``).
The paper's CIFAR runs use ``weight_decay=5e-4`` (``train.py``) and a step schedule x0.2.

Memory: KOALA-V keeps no per-parameter buffer; KOALA-M keeps ``v`` and ``x_avg`` (two, like Adam),
and on the C kernels by default a third, the predict buffer (below).

Code paths, all with the same element-wise arithmetic: per tensor (CPU default below 4M elements:
a tensor's few ops run while it is in cache), foreach (other devices), C kernels (``native``; the
CPU default from 4M elements, float32/float64) and ``torch.compile``'d loops (``compile=True``,
or where the C kernels cannot be built). On the C kernels the update (``skip="layer"``) is one
kernel that goes tensor by tensor: a tensor's reductions (its chunks split over the threads),
its gains (:func:`_gains`'s formulas in C, operation by operation) and its update (read x, g,
v; write x, v), so the gains need no round trip through torch; ``skip="iteration"`` needs every
layer's norm first and runs the reductions, the gains in torch and the update as three passes.
KOALA-M's predict in the paper's order is one more kernel (read x, v, x_avg; write x, x_avg; sum
||x - x_avg||^2); ``v^ = kappa v`` is applied in the update's pass (``v <- kappa v - b G``),
which saves a write of v: the closure sees x^ = x + v, the state after the step is the same, and
a closure that raises still leaves v = kappa v. In place that is 11 memory passes over the
parameters per KOALA-M step (KOALA-V: 4; fused AdamW: 7), the floor for this order: the predict
and the update each read and write x, a layer's gain needs its ||g_l|| before any of g_l is
applied, and v is read by both.

``predict_buffer=True`` (KOALA-M default on the C kernels with q_mode="paper"; not in the paper
or the code): the update's pass also does the next step's element-wise predict, writing
x^ = x' + v' into a second weight-sized buffer (non-temporal stores: it is only written) while
the weights keep the filtered x', v is kept undecayed, and the weight average moves and
||x' - x_avg||^2 is taken there; the next step's predict swaps that buffer in as the weights'
storage (``p.data``; the old storage becomes the next buffer) and only finishes the scalar part.
That is 9 passes and one more buffer. Every closure sees, and the weights between steps hold,
exactly what the paper's order in place gives, bit for bit (tested, also across a state_dict
round trip, where the buffer is not saved and x + v is added instead, the same floats, and
after a closure that raised). Where the weights were changed in place between steps (their
version counter or storage moved: Lookahead's sync, a model's ``load_state_dict``) the stale
buffer is not used and x + v is added to the changed weights, so the closure still sees exactly
the paper's point, but that step's Q and the weight average come from the weights the update
left (the paper's predict would take them after the change). The state between steps differs
from the in-place order only in ``x_avg`` (already moved), ``diff_sq`` (the next Q's
||x - x_avg||^2) and the marker ``avg_ahead``, all in the state_dict; any code path continues
from it. Parameters that are views into a larger storage (a flat parameter buffer) keep the
in-place order: swapping their storage would cut them loose. ``predict_buffer=False``: the
paper's order in place.

``fuse_predict=True`` (KOALA-M, an option; not in the paper or the code) moves step k+1's
element-wise predict into step k's update in place: one C-kernel pass (read x, g, v, x_avg;
write x, v, x_avg; 8 passes with the reduction, no extra buffer), or the same operations one
after the other on the torch paths. The sequence of measurements is unchanged: every closure sees
exactly the weights of the paper's order (bit for bit in the tests), Q and P^ are the same, and
the next step only finishes the predict's scalar part. What changes is the state between steps:
the weights hold the prediction x^ = x + v (and v its decayed value), not the filtered estimate
x, so anything that reads or writes the weights between steps (BYOL's target EMA, checkpoints,
evaluation, Lookahead's sync) meets x^: the form in which torch's SGD keeps Nesterov momentum.
The predict's sum ||x - x_avg||^2 waits in the state (``diff_sq``, saved in the state_dict).
It takes precedence over ``predict_buffer``.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _native, protocol
from ._compile import COMPILE_MIN_NUMEL, CompiledLoop, wants_compile

_F64 = torch.float64
_CHOICES = {"variant": ("v", "m"), "r_mode": ("paper", "code"), "q_mode": ("paper", "code"),
            "target": ("relative", "absolute"), "wd_mode": ("objective", "code"),
            "skip": ("layer", "iteration")}


class KOALA(Optimizer):
    """KOALA-V (``variant="v"``) or KOALA-M (``variant="m"``); see the module docstring.

    Args:
        params: parameters or param groups (each group may set ``lr`` and ``weight_decay``).
        lr: eps_k of the target loss (``L - L_target = lr * L``); 1.0 in the paper.
        variant: ``"v"`` (vanilla) or ``"m"`` (momentum).
        weight_decay: L2 coefficient (see ``wd_mode``).
        sigma, q: KOALA-V initial P and constant Q.
        sw, sc, sv, kappa, qw, qv: KOALA-M initial P = [[sw, sc], [sc, sv]], velocity decay,
            initial q_w (code estimator) and constant q_v.
        q_mode, avg_beta, q_beta: KOALA-M process-noise estimator (``"paper"`` eqs. 50-52 /
            ``"code"``), weight-average decay b_x, EMA decay of the code's q_w.
        r: fixed R (None: estimate it); r_beta, r_init: EMA decay and start of R; r_mode:
            ``"paper"`` (eq. 49, centred on the target) or ``"code"`` (raw second moment).
        target: ``"relative"`` (form (b), default) or ``"absolute"`` (form (a)).
        wd_mode: ``"objective"`` (default) or ``"code"``.
        skip, skip_threshold: ``"layer"`` (code) or ``"iteration"`` (Alg. 2), threshold theta.
        foreach: multi-tensor kernels; None: on every device but the CPU.
        compile: run the per-tensor passes through ``torch.compile`` (one fused kernel per tensor
            and pass); None: on the CPU from ``_compile.COMPILE_MIN_NUMEL`` (4M) elements, as LARS,
            where the C kernels (``native``) cannot be had.
        native: the C kernels (one pass over all tensors per kernel, see the module docstring)
            for float32/float64 CPU tensors; None: from ``COMPILE_MIN_NUMEL`` elements unless
            ``compile=True``.
        fuse_predict: KOALA-M only: the next step's predict fused into this step's update (the
            same measurements; between steps the weights are x + v; module docstring).
        predict_buffer: KOALA-M on the C kernels: the next step's x + v written by the update
            into a second buffer that the predict swaps in (the paper's order bit for bit, one
            more weight-sized buffer, 9 instead of 11 memory passes; module docstring).
    """

    requires_closure = True   # step() reads the closure's per-sample losses
    supports_growth = False   # per-layer covariances and C-kernel layouts fixed at first use

    def __init__(self, params, lr: float = 1.0, variant: str = "m", weight_decay: float = 0.0, *,
                 sigma: float = 0.1, q: float = 1.0,
                 sw: float = 0.1, sc: float = 0.0, sv: float = 0.1, kappa: float = 0.9,
                 qw: float = 1e-2, qv: float = 1e-2, q_mode: str = "paper",
                 avg_beta: float = 0.9, q_beta: float = 0.9,
                 r: Optional[float] = None, r_beta: float = 0.9, r_init: float = 1.0,
                 r_mode: str = "paper", target: str = "relative", wd_mode: str = "objective",
                 skip: str = "layer", skip_threshold: float = 1e-9,
                 foreach: Optional[bool] = None, compile: Optional[bool] = None,
                 native: Optional[bool] = None, fuse_predict: bool = False,
                 predict_buffer: bool = True):
        for name, value in dict(variant=variant, r_mode=r_mode, q_mode=q_mode, target=target,
                                wd_mode=wd_mode, skip=skip).items():
            if value not in _CHOICES[name]:
                raise ValueError(f"KOALA: {name}={value!r}, expected one of {_CHOICES[name]}")
        checks = [("lr", lr, lr >= 0), ("weight_decay", weight_decay, weight_decay >= 0),
                  ("sigma", sigma, sigma > 0), ("q", q, q >= 0), ("sw", sw, sw > 0),
                  ("sv", sv, sv > 0), ("sc", sc, sc * sc < sw * sv),
                  ("kappa", kappa, 0 <= kappa <= 1), ("qw", qw, qw >= 0), ("qv", qv, qv >= 0),
                  ("avg_beta", avg_beta, 0 <= avg_beta < 1), ("q_beta", q_beta, 0 <= q_beta < 1),
                  ("r", r, r is None or r > 0), ("r_beta", r_beta, 0 <= r_beta < 1),
                  ("r_init", r_init, r_init > 0), ("skip_threshold", skip_threshold,
                                                   skip_threshold >= 0)]
        if fuse_predict and variant != "m":
            raise ValueError("KOALA: fuse_predict needs variant='m' (KOALA-V has no predict)")
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"KOALA: invalid {name}={value!r}"
                                 + (" (need sc^2 < sw*sv)" if name == "sc" else ""))
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, foreach=foreach))
        self.variant, self.sigma, self.q = variant, float(sigma), float(q)
        self.sw, self.sc, self.sv, self.kappa = float(sw), float(sc), float(sv), float(kappa)
        self.qw, self.qv, self.q_mode = float(qw), float(qv), q_mode
        self.avg_beta, self.q_beta = float(avg_beta), float(q_beta)
        self.r, self.r_beta, self.r_init, self.r_mode = r, float(r_beta), float(r_init), r_mode
        self.target, self.wd_mode = target, wd_mode
        self.skip, self.skip_threshold = skip, float(skip_threshold)
        self._scratch: dict = {}
        self.compile, self.native = compile, native
        self._layouts: dict = {}        # C-kernel chunk tables, per list of tensors
        self._pending: Optional[_Layout] = None   # native predict done, v not yet decayed
        self.fuse_predict, self.predict_buffer = bool(fuse_predict), bool(predict_buffer)
        self._ybufs: Optional[list] = None        # the predict buffer: x + v of the next step
        self._ystamp: list = []
        dev = self._device()
        glob = {"R": torch.tensor(self.r if self.r is not None else self.r_init, dtype=_F64,
                                  device=dev)}
        if variant == "v":
            glob["P"] = torch.tensor(self.sigma, dtype=_F64, device=dev)
        else:
            glob["P"] = torch.tensor([[self.sw, self.sc], [self.sc, self.sv]], dtype=_F64,
                                     device=dev)
            glob["qw"] = torch.tensor(self.qw, dtype=_F64, device=dev)
        glob["P_prior"] = glob["P"].clone()
        self.state["koala"] = glob

    # ----------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    @property
    def P(self) -> Tensor:
        """The posterior covariance (0-d for V, 2x2 for M), float64."""
        return self.state["koala"]["P"]

    @property
    def R(self) -> Tensor:
        return self.state["koala"]["R"]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._ybufs, self._pending = None, None
        self._layouts.clear()                   # they keep the replaced state's buffers
        glob = self.state.get("koala")
        if glob is None:
            raise ValueError("KOALA.load_state_dict: no 'koala' entry (not a KOALA state_dict)")
        dev = self._device()
        self.state["koala"] = {k: v.to(device=dev, dtype=_F64, copy=True) for k, v in glob.items()}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_scratch", {})
        self.__dict__.setdefault("compile", None)
        self.__dict__.setdefault("native", None)
        self.__dict__.setdefault("_layouts", {})
        self.__dict__.setdefault("_pending", None)
        self.__dict__.setdefault("fuse_predict", False)
        self.__dict__.setdefault("predict_buffer", True)
        self.__dict__.setdefault("_ybufs", None)
        self.__dict__.setdefault("_ystamp", [])

    def _foreach(self, group: dict, ref: Tensor) -> bool:
        return group["foreach"] if group["foreach"] is not None else ref.device.type != "cpu"

    def _buf(self, p: Tensor) -> Tensor:
        """A reused flat scratch buffer as large as ``p`` (per device and dtype)."""
        key = (p.device, p.dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < p.numel():
            buf = self._scratch[key] = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        return buf[:p.numel()].view_as(p)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One KOALA step: [KOALA-M predict], ``closure()`` once, update. Returns the closure's
        per-sample loss vector."""
        if closure is None:
            raise ValueError("KOALA.step needs a closure that runs zero_grad/forward/backward and "
                             "returns the per-sample loss vector")
        glob = self.state["koala"]
        if self.variant == "m" and "diff_sq" in glob:
            # the last update did the predict's element-wise work: with fuse_predict it moved
            # the weights to x^ = x + v; with the predict buffer ("avg_ahead") x^ waits in it
            params = [p for g in self.param_groups for p in g["params"]]
            diff_sq = glob.pop("diff_sq")
            if glob.pop("avg_ahead", None) is not None:
                self._move_ahead(params)
            self._q_and_prior(glob, diff_sq, params, self.q_mode == "paper")
        elif self.variant == "m":
            self._predict()
        else:
            glob["P_prior"] = glob["P"] + self.q                        # P^ = P + Q  (eq. 31)
        try:
            with torch.enable_grad():
                out = closure()
            self._update(protocol.sample_losses(out, "KOALA"))
            if self.fuse_predict and "diff_sq" not in glob:   # not fused in the C kernel
                glob["diff_sq"] = self._predict_moves()
        finally:        # a no-op unless the closure or the update raised after a native predict:
            self._finish_predict()          # then the state is the predicted one, v^ included
        return out

    # ----------------------------------------------------------------------------------------
    def _wants_compile(self, params: list) -> bool:
        return (wants_compile(self.compile, params)
                and len({(p.device, p.dtype) for p in params}) == 1)

    def _native_layout(self, params: list) -> Optional["_Layout"]:
        """The C kernels' layout of ``params`` (cached per list) if they are to run on them."""
        if self.native is False or not params:
            return None
        key = tuple(map(id, params))
        if key not in self._layouts:
            if len(self._layouts) > 8:
                self._layouts.clear()
            self._layouts[key] = self._new_layout(params)
        layout = self._layouts[key]
        return layout if layout is not None and layout.matches(params) else None

    def _new_layout(self, params: list) -> Optional["_Layout"]:
        p0 = params[0]
        if (p0.device.type != "cpu" or p0.dtype not in (torch.float32, torch.float64)
                or (self.native is None and (self.compile or sum(p.numel() for p in params)
                                             < COMPILE_MIN_NUMEL))
                or not all(p.device.type == "cpu" and p.dtype == p0.dtype for p in params)):
            return None
        if _native_kernels() is None:
            _warn_native_once()
            return None
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        return _Layout(params, [group_of[id(p)] for p in params])

    def _finish_predict(self) -> None:
        """After a native predict: v <- kappa v where the update will not do it."""
        layout, self._pending = self._pending, None
        if layout is not None:
            torch._foreach_mul_(self._bufs(layout)[0], self.kappa)
            self._ybufs = None              # after a swap they hold the stale x

    @staticmethod
    def _stamp(params: list) -> list:
        """What tells whether the weights were touched since the predict buffer was written."""
        return [(p.data_ptr(), p._version) for p in params]

    def _move_ahead(self, params: list) -> None:
        """The predict's x <- x + v after a predict-buffer update (which has already moved the
        weight average and taken ||x - x_avg||^2): the buffer, which holds x + v, is swapped in
        as the weights' storage (the old storage becomes the next buffer), unless the weights
        were changed since it was written (Lookahead's sync, a load_state_dict), or it is
        missing (after a state_dict round trip): then x + v is added here, the same floats."""
        layout = self._native_layout(params)
        ys, self._ybufs = self._ybufs, None
        vs = (self._bufs(layout)[0] if layout is not None
              else [self.state[p]["velocity"] for p in params])
        if ys is not None and layout is not None and self._ystamp == self._stamp(params):
            olds = []
            for p, y in zip(params, ys):
                olds.append(p.data)
                p.data = y
            self._ybufs = olds
        else:
            torch._foreach_add_(params, vs)
        if layout is not None:
            self._pending = layout          # v^ = kappa v is the C-kernel update's
        else:
            torch._foreach_mul_(vs, self.kappa)

    def _predict(self) -> None:
        """KOALA-M predict (Alg. 2): Q from the weight average, x <- x + v, v <- kappa v,
        P^ = F P F^T + Q."""
        params = [p for g in self.param_groups for p in g["params"]]
        self._q_and_prior(self.state["koala"], self._predict_moves(), params,
                          self.q_mode == "paper")

    def _predict_moves(self) -> Tensor:
        """The element-wise part of the predict: the weight average (paper q_mode), x <- x + v,
        v <- kappa v (deferred to the update after a C-kernel predict); returns
        sum ||x - x_avg||^2 (float64) for Q."""
        glob, paper = self.state["koala"], self.q_mode == "paper"
        b, dev = self.avg_beta, glob["P"].device
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params:
            st = self.state[p]
            if "velocity" not in st:
                st["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["x_avg"] = (p.detach().clone(memory_format=torch.preserve_format) if paper
                               else torch.zeros_like(p, memory_format=torch.preserve_format))
        vs = [self.state[p]["velocity"] for p in params]
        avgs = [self.state[p]["x_avg"] for p in params]
        sq = None
        layout = self._native_layout(params)
        if layout is not None and all(t.is_contiguous() for t in vs + avgs):
            diff_sq = _native_kernels().predict(layout, params, vs, avgs,
                                                1.0 - b if paper else 0.0, paper).to(dev)
            torch.autograd.graph.increment_version(params)
            self._pending = layout          # x^ = x + v is done; v^ = kappa v is the update's
            return diff_sq
        if params and self._wants_compile(params):
            out = torch.empty(len(params), dtype=params[0].dtype, device=params[0].device)
            if _COMPILED_PREDICT([(params, vs, avgs, out, 1.0 - b if paper else 0.0,
                                   self.kappa)]):
                sq = out
            else:
                self.compile = False
        if params and sq is None:
            if self._foreach(self.param_groups[0], params[0]):
                diffs = torch._foreach_sub(params, avgs)
                norms = torch._foreach_norm(diffs)
                if paper:
                    torch._foreach_add_(avgs, diffs, alpha=1.0 - b)        # eq. 50
                del diffs
                torch._foreach_add_(params, vs)                           # x^ = x + v
                torch._foreach_mul_(vs, self.kappa)                       # v^ = kappa v
            else:
                norms = []
                for p, v, a in zip(params, vs, avgs):
                    d = torch.sub(p, a, out=self._buf(p))
                    norms.append(torch.linalg.vector_norm(d))
                    if paper:
                        a.add_(d, alpha=1.0 - b)
                    p.add_(v)
                    v.mul_(self.kappa)
            sq = torch.stack(norms).square()
        return (sq.to(device=dev, dtype=_F64).sum() if sq is not None
                else torch.zeros((), dtype=_F64, device=dev))

    def _q_and_prior(self, glob: dict, diff_sq: Tensor, params: list, paper: bool) -> None:
        """q_x from sum ||x - x_avg||^2 (eq. 51 or the code's EMA) and P^ = F P F^T + Q."""
        b = self.avg_beta
        n = max(sum(p.numel() for p in params), 1)
        if paper:
            q_x = diff_sq * (b * b) / n                 # ||x - x_avg_new||^2 / n, eq. 51
        else:
            glob["qw"] = self.q_beta * glob["qw"] + (1.0 - self.q_beta) * diff_sq.sqrt() / n
            q_x = glob["qw"]
        # P^ = F P F^T + Q with F = [[1, 1], [0, kappa]], written out (no host-to-device copy)
        (P00, P01, P10, P11), k = glob["P"].reshape(4).unbind(), self.kappa
        p00 = P00 + P01 + P10 + P11 + q_x
        p01 = k * (P01 + P11)
        p10 = k * (P10 + P11)
        p11 = k * k * P11 + self.qv
        glob["P_prior"] = torch.stack([p00, p01, p10, p11]).reshape(2, 2)

    # ----------------------------------------------------------------------------------------
    def _loss_stats(self, losses: Tensor, dev) -> tuple[Tensor, Tensor]:
        """Global mean and mean of squares of the per-sample losses (all-reduced under DDP)."""
        l64 = losses.reshape(-1).to(_F64)
        stats = torch.stack([l64.sum(), l64.square().sum(),
                             torch.full((), float(l64.numel()), dtype=_F64, device=l64.device)])
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        stats = stats.to(dev)
        return stats[0] / stats[2], stats[1] / stats[2]

    def _reductions(self, groups, compiled: bool, dev, native=None):
        """Per layer ||g||, ||x||^2 and <g, x> (float64 vectors over all layers with a grad);
        ||x||^2 and <g, x> are 0 where the group has no weight decay (eager paths skip them)."""
        if native is not None:
            out = _native_kernels().reduce(native).to(dev)
            if native.rows is not None:
                out = out[native.rows]
            return out[:, 0].clamp_min(0.0).sqrt(), out[:, 1], out[:, 2]
        if compiled:
            params = [p for _, ps in groups for p in ps]
            out = torch.empty(len(params), 3, dtype=params[0].dtype, device=params[0].device)
            if _COMPILED_REDUCE([([p.grad for p in params], params, out)]):
                out = out.to(device=dev, dtype=_F64)
                return out[:, 0].clamp_min(0.0).sqrt(), out[:, 1], out[:, 2]
            self.compile = False
        gn, wsq, dots = [], [], []
        for group, params in groups:
            grads = [p.grad for p in params]
            n = len(params)
            if group["weight_decay"] != 0.0:
                norms = torch._foreach_norm(grads + params)
                gn.append(torch.stack(norms[:n]).to(device=dev, dtype=_F64))
                wsq.append(torch.stack(norms[n:]).to(device=dev, dtype=_F64).square())
                dots.append(torch.stack([torch.dot(g.view(-1), p.view(-1))
                                         if g.is_contiguous() and p.is_contiguous()
                                         else (g * p).sum() for g, p in zip(grads, params)]
                                        ).to(device=dev, dtype=_F64))
            else:
                gn.append(torch.stack(torch._foreach_norm(grads)).to(device=dev, dtype=_F64))
                wsq.append(torch.zeros(n, dtype=_F64, device=dev))
                dots.append(torch.zeros(n, dtype=_F64, device=dev))
        return torch.cat(gn), torch.cat(wsq), torch.cat(dots)

    def _update(self, losses: Tensor) -> None:
        glob = self.state["koala"]
        P_hat = glob["P_prior"]
        dev = P_hat.device
        momentum = self.variant == "m"
        L, m2 = self._loss_stats(losses, dev)

        # R (eq. 49 or the code's raw second moment); the target of the first group's lr.
        R_old = glob["R"]
        if self.r is not None:
            R_new = R_old
        else:
            eps = float(self.param_groups[0]["lr"])
            if self.r_mode == "code":
                obs = m2
            elif self.target == "relative":
                obs = m2 - (1.0 - eps * eps) * L * L       # mean (l_i - (1 - eps) L)^2
            else:
                obs = m2 - L * L + eps * eps               # mean (l_i - (L - eps))^2
            R_new = self.r_beta * R_old + (1.0 - self.r_beta) * obs.clamp_min(0.0)

        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        groups = [(g, ps) for g, ps in groups if ps]
        if not groups:
            glob["R"], glob["P"] = R_new, P_hat
            self._finish_predict()
            return
        all_params = [p for _, ps in groups for p in ps]
        native = self._native_plan(all_params)
        if native is None:
            self._finish_predict()              # the torch paths step from v^ = kappa v
        elif self.skip == "layer":
            self._update_native(native, P_hat, L, R_new)
            return
        compiled = native is None and self._wants_compile(all_params)

        # Pass 1: per-layer reductions; per-layer lr and wd as vectors (no host syncs).
        gn, wsq, dots = self._reductions(groups, compiled, dev, native)
        lr = torch.cat([torch.full((len(ps),), float(g["lr"]), dtype=_F64, device=dev)
                        for g, ps in groups])
        wd = torch.cat([torch.full((len(ps),), float(g["weight_decay"]), dtype=_F64, device=dev)
                        for g, ps in groups])
        ok = gn >= self.skip_threshold
        if self.skip == "iteration":
            all_ok = ok.all()
            ok = ok & all_ok
            R_new = torch.where(all_ok, R_new, R_old)
        coefs, h_max = _gains(gn, wsq, dots, lr, wd, P_hat, R_new, L, ok, momentum=momentum,
                              relative=self.target == "relative",
                              objective=self.wd_mode == "objective",
                              wd_in_step=not (self.variant == "v" and self.wd_mode == "code"),
                              lerp_w=(1.0 - self.avg_beta) if self.q_mode == "code" else None)
        self._posterior(P_hat, h_max, R_new)

        dtype = all_params[0].dtype
        if native is not None:
            self._apply_native(native, coefs, dtype)
            return
        coefs = [c.to(dtype) for c in coefs]
        if compiled:
            cols = [list(c.unbind()) for c in coefs]
            if self._apply_compiled(all_params, cols):
                return
        start = 0
        for group, params in groups:
            n = len(params)
            cols = [list(c[start:start + n].to(params[0].dtype).unbind()) for c in coefs]
            start += n
            self._apply_eager(group, params, cols)

    def _posterior(self, P_hat: Tensor, h_max: Tensor, R_new: Tensor) -> None:
        """P = P^ - P^ diag(max_l h_l, 0) P^^T (KOALA-M) or P^ - P^^2 max_l h_l (KOALA-V), and R."""
        glob = self.state["koala"]
        if self.variant == "m":
            col = P_hat[:, 0]
            glob["P"] = P_hat - h_max * torch.outer(col, col)
        else:
            glob["P"] = P_hat - P_hat * P_hat * h_max       # = R P^ / (P^ ||G||^2 + R)
        glob["R"] = R_new

    def _update_native(self, layout: "_Layout", P_hat: Tensor, L: Tensor, R_new: Tensor) -> None:
        """The whole update in one C kernel (``skip="layer"``): tensor after tensor, its
        reductions, its gains (:func:`_gains`'s formulas in C) and its step; with
        ``fuse_predict`` the next step's predict in the same pass, in place, and with the
        predict buffer the same into the buffer (module docstring)."""
        momentum = self.variant == "m"
        ahead = momentum and self.q_mode == "paper" and self._covers_all(layout)
        fused = ahead and self.fuse_predict                 # the next predict in place
        split = ahead and not fused and self.predict_buffer  # ... into the predict buffer
        ys = None
        if split:           # the storage the predict swapped out (the layout's shapes), or new
            ys = self._ybufs
            if ys is None or len(ys) != len(layout.params):
                ys = _new_predict_buffer(layout.params)
            split = ys is not None
        lerp = momentum and self.q_mode == "code"
        pg = self.param_groups
        lr = torch.tensor([float(pg[i]["lr"]) for i in layout.groups], dtype=_F64)
        wd = torch.tensor([float(pg[i]["weight_decay"]) for i in layout.groups], dtype=_F64)
        ph = P_hat.reshape(-1).tolist() if momentum else [P_hat.item(), 0.0]   # CPU: no sync
        kin = self.kappa if self._pending is not None else 1.0     # 1: v^ already decayed
        sc = torch.tensor([ph[0], ph[2] if momentum else 0.0, R_new.item(), L.item(),
                           self.skip_threshold, kin, 1.0 if split else self.kappa,
                           1.0 - self.avg_beta], dtype=_F64)
        flags = (int(momentum) | int(self.target == "relative") << 1
                 | int(self.wd_mode == "objective") << 2 | int(lerp) << 3
                 | int(fused or split) << 4)
        params = layout.params
        vs, avgs, _ = self._bufs(layout) if momentum else (None, None, None)
        avgs = avgs if lerp or fused or split else None
        res = _native_kernels().update(layout, vs, avgs, lr, wd, sc, flags, ys)
        self._pending = None
        torch.autograd.graph.increment_version(params)
        self._posterior(P_hat, res[0], R_new)
        if fused or split:
            self.state["koala"]["diff_sq"] = res[1]
        if split:       # weights at x, v not decayed, the average moved, x + v in the buffer
            self.state["koala"]["avg_ahead"] = torch.ones((), dtype=_F64)
            self._ybufs, self._ystamp = ys, self._stamp(params)

    def _native_plan(self, all_params) -> Optional["_Layout"]:
        """The C kernels' layout for this update with its gradients and weight-decay flags set,
        or None (torch paths). After a native predict it is the predict's layout (all
        parameters: those without a gradient only get v <- kappa v)."""
        layout = self._pending
        if layout is None:
            layout = self._native_layout(all_params)
            if layout is None or (self.variant == "m" and not self._bufs(layout)[2]):
                return None
        dt = layout.dtype
        grads = [p.grad for p in layout.params]
        for g in grads:
            if g is not None and not (g.dtype == dt and g.is_cpu and g.layout == torch.strided
                                      and g.is_contiguous()):
                return None
        group_wd = [float(g["weight_decay"]) != 0.0 for g in self.param_groups]
        layout.prepare(grads, group_wd, not (self.variant == "v" and self.wd_mode == "code"))
        return layout

    def _native_cols(self, layout: "_Layout", coefs: list, dtype) -> Tensor:
        """The [5, n] coefficient table of the C kernels (zeros for tensors without a grad)."""
        cols = torch.stack(coefs + [torch.zeros_like(coefs[0])] * (5 - len(coefs))).to(dtype)
        if layout.rows is not None:                 # parameters without a gradient: zeros
            full = cols.new_zeros(5, len(layout.params))
            full[:, layout.rows] = cols
            cols = full
        return cols.contiguous()

    def _covers_all(self, layout: "_Layout") -> bool:
        """The layout covers every parameter, their velocities and averages contiguous (the
        next predict can be done in the update's pass)."""
        n = sum(len(g["params"]) for g in self.param_groups)
        return len(layout.params) == n and self._bufs(layout)[2]

    def _bufs(self, layout: "_Layout") -> tuple:
        """KOALA-M's velocities and weight averages of the layout's parameters, and whether all
        are contiguous; kept on the layout (the kernels change them in place, and
        ``load_state_dict`` drops the layouts)."""
        if layout.bufs is None:
            vs = [self.state[p]["velocity"] for p in layout.params]
            avgs = [self.state[p]["x_avg"] for p in layout.params]
            layout.bufs = (vs, avgs, all(t.is_contiguous() for t in vs + avgs))
        return layout.bufs

    def _apply_native(self, layout: "_Layout", coefs: list, dtype) -> None:
        momentum = self.variant == "m"
        kappa = self.kappa if self._pending is not None else 1.0   # 1: v^ already decayed
        lerp = momentum and self.q_mode == "code"
        cols = self._native_cols(layout, coefs, dtype)
        params = layout.params
        vs, avgs, _ = self._bufs(layout) if momentum else (None, None, None)
        avgs = avgs if lerp else None
        _native_kernels().apply(layout, params, vs, avgs, cols, kappa, momentum, lerp)
        self._pending = None
        torch.autograd.graph.increment_version(params)

    def _state_lists(self, params, cols):
        vs = [self.state[p]["velocity"] for p in params] if len(cols) > 2 else None
        avgs = [self.state[p]["x_avg"] for p in params] if len(cols) > 4 else None
        return vs, avgs

    def _apply_compiled(self, params, cols) -> bool:
        vs, avgs = self._state_lists(params, cols)
        grads = [p.grad for p in params]
        if vs is None:
            ok = _COMPILED_APPLY_V([(params, grads, *cols)])
        else:
            ok = _COMPILED_APPLY_M([(params, grads, vs, avgs, *cols[:4],
                                     cols[4] if avgs is not None else None)])
        if not ok:
            self.compile = False
        return ok

    def _apply_eager(self, group, params, cols) -> None:
        vs, avgs = self._state_lists(params, cols)
        grads = [p.grad for p in params]
        shrink, neg_a = cols[0], cols[1]
        use_wd = (group["weight_decay"] != 0.0
                  and not (self.variant == "v" and self.wd_mode == "code"))
        if self._foreach(group, params[0]):
            if vs is not None:
                torch._foreach_addcmul_(vs, grads, cols[2])
                if use_wd:
                    torch._foreach_addcmul_(vs, params, cols[3])
            if use_wd:
                torch._foreach_mul_(params, shrink)
            torch._foreach_addcmul_(params, grads, neg_a)
            if avgs is not None:
                torch._foreach_lerp_(avgs, params, cols[4])
            return
        for i, (p, g) in enumerate(zip(params, grads)):
            if vs is not None:
                vs[i].addcmul_(g, cols[2][i])
                if use_wd:
                    vs[i].addcmul_(p, cols[3][i])
            if use_wd:
                p.mul_(shrink[i])
            p.addcmul_(g, neg_a[i])
            if avgs is not None:
                avgs[i].lerp_(p, cols[4][i])


def _new_predict_buffer(params: list) -> Optional[list]:
    """Buffers for the next step's x + v, shaped like ``params``; None (the in-place order) where
    a parameter is a view into a larger storage (a flat parameter buffer): swapping its storage
    would cut it loose from the rest."""
    for p in params:
        if (p.storage_offset() != 0
                or p.untyped_storage().nbytes() != p.numel() * p.element_size()):
            return None
    return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]


def _gains(gn: Tensor, wsq: Tensor, dots: Tensor, lr: Tensor, wd: Tensor, P_hat: Tensor,
           R: Tensor, L: Tensor, ok: Tensor, *, momentum: bool, relative: bool, objective: bool,
           wd_in_step: bool, lerp_w: Optional[float] = None) -> tuple[list, Tensor]:
    """The per-layer gains from the per-layer ``||g_l||``, ``||x_l||^2`` and ``<g_l, x_l>``
    (float64 vectors; ``ok``: the layers that step). Returns the coefficient rows of the step
    (``1 - a wd``, ``-a``; KOALA-M also ``-b``, ``-b wd`` and, in q_mode="code", the average's
    lerp weight) and ``max_l h_l``::

        ||G_l||^2 = ||g||^2 + 2 wd <g, x> + wd^2 ||x||^2      (G = g + wd x, no copy of G)
        S_l = P^_00 ||G_l||^2 + R ;  gap = lr (L + L2 term) (relative) or lr (absolute)
        a_l = P^_00 gap / S_l ;  b_l = P^_10 gap / S_l ;  h_l = ||G_l||^2 / S_l

    The C kernel ``koala_update`` computes the same, operation by operation."""
    p00 = P_hat[0, 0] if momentum else P_hat
    Gsq = (gn.square() + 2.0 * wd * dots + wd.square() * wsq).clamp_min(0.0)
    reg = 0.5 * wd * wsq                                # each layer's own L2 term (code)
    if objective:
        reg = reg.sum()                                 # the objective's L2 term (all layers)
    S = p00 * Gsq + R
    gap = lr * (L + reg) if relative else lr            # L - L_target, form (b) / (a)
    zero = torch.zeros_like(S)
    a = torch.where(ok, p00 * gap / S, zero)            # gain of x
    h_max = torch.where(ok, Gsq / S, zero).max()
    wd_dir = wd if wd_in_step else zero
    coefs = [1.0 - wd_dir * a, -a]                      # x <- (1 - a wd) x - a g
    if momentum:                                        # v <- v - b g - b wd x
        b = torch.where(ok, P_hat[1, 0] * gap / S, zero)
        coefs += [-b, -wd_dir * b]
        if lerp_w is not None:                          # gt <- lerp(gt, x, w) (q_mode="code")
            coefs.append(torch.where(ok, torch.full_like(S, lerp_w), zero))
    return coefs, h_max


# ---------------------------------------------------------------------- C kernels (CPU)
# The tensors are cut into chunks of ``_CHUNK`` elements (a table of (tensor, offset, length)).
# The predict, reduce and apply kernels run one OpenMP loop (static schedule) over all chunks of
# all tensors; the update kernel runs one parallel region that goes tensor by tensor, each
# tensor's chunks split over the threads (see koala_update). Reductions are summed per chunk in
# double (independent accumulators, so that the sum is bandwidth-bound) and then per tensor in
# chunk order: the result does not depend on the thread count. Element-wise arithmetic
# is the eager path's, operation by operation, in the parameters' dtype (``-ffp-contract=off``:
# no fused multiply-adds the eager ops would not do). Compiled once per machine with the system C
# compiler into ``$SSL_SUITE_CACHE`` (default ``~/.cache/ssl_suite``) and loaded with ctypes; the
# .so links the libgomp torch has already loaded, so it shares torch's OpenMP threads (the scheme
# of ``mbf.py``). Any failure (no compiler, a failed self-check) leaves the torch paths in charge
# with a warning; ``SSL_SUITE_KOALA_NATIVE=0`` disables the kernels process-wide, ``native=False``
# per optimizer.

_CHUNK = 1 << 15

_C_HEAD = r"""
#include <stdint.h>
#include <stddef.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#define ACC 16

/* Non-temporal stores of ACC-element blocks, for a stream that is only written (the predicted
   weights of the split update): a plain store that misses the cache first reads the line, one
   more memory transfer for every element. NT_ALIGN: the alignment they need (0: no such
   stores here; a chunk that is not aligned uses plain stores); a thread fences after its
   chunk. Streams that are read and written gain nothing from them (measured: slower). */
#if defined(__AVX512F__)
#include <immintrin.h>
#define NT_ALIGN 64
static inline void nt_block_f32(float* d, const float* s) {
    _mm512_stream_ps(d, _mm512_loadu_ps(s)); }
static inline void nt_block_f64(double* d, const double* s) {
    _mm512_stream_pd(d, _mm512_loadu_pd(s)); _mm512_stream_pd(d + 8, _mm512_loadu_pd(s + 8)); }
#elif defined(__AVX__)
#include <immintrin.h>
#define NT_ALIGN 32
static inline void nt_block_f32(float* d, const float* s) {
    for (int k = 0; k < 16; k += 8) _mm256_stream_ps(d + k, _mm256_loadu_ps(s + k)); }
static inline void nt_block_f64(double* d, const double* s) {
    for (int k = 0; k < 16; k += 4) _mm256_stream_pd(d + k, _mm256_loadu_pd(s + k)); }
#elif defined(__SSE2__)
#include <emmintrin.h>
#define NT_ALIGN 16
static inline void nt_block_f32(float* d, const float* s) {
    for (int k = 0; k < 16; k += 4) _mm_stream_ps(d + k, _mm_loadu_ps(s + k)); }
static inline void nt_block_f64(double* d, const double* s) {
    for (int k = 0; k < 16; k += 2) _mm_stream_pd(d + k, _mm_loadu_pd(s + k)); }
#else
#define NT_ALIGN 0
static inline void nt_block_f32(float* d, const float* s) {
    for (int k = 0; k < 16; k++) d[k] = s[k]; }
static inline void nt_block_f64(double* d, const double* s) {
    for (int k = 0; k < 16; k++) d[k] = s[k]; }
#endif
#if NT_ALIGN
#define NT_FENCE() _mm_sfence()
#define NT_OK(p) (((uintptr_t)(p)) % NT_ALIGN == 0)
#else
#define NT_FENCE() ((void)0)
#define NT_OK(p) 0
#endif
"""

# $S: element type, $SUF: its suffix. x, v, a, g: per-tensor base pointers (g[t] may be NULL:
# no gradient); ch: [nch][3] chunk table (tensor, offset, length).
_C_API = r"""
/* ---- chunk bodies (static inline; each kernel below is a loop over chunks of these) ---- */

/* KOALA-M predict on one chunk: d = x - a; returns sum d^2; paper: a <- a + w d; x <- x + v
   (v is NOT decayed: the apply does v <- kappa v). code (paper == 0): sum (a - x)^2. */
static inline double predict_chunk_$SUF($S* restrict xp, const $S* restrict vp,
                                        $S* restrict ap, int64_t n, $S ws, int paper) {
    double acc[ACC] = {0};
    int64_t i = 0;
    if (paper) {
        for (; i + ACC <= n; i += ACC)
            for (int j = 0; j < ACC; j++) {
                const $S xi = xp[i + j], ai = ap[i + j], d = xi - ai;
                acc[j] += (double)d * (double)d;
                ap[i + j] = ai + ws * d;
                xp[i + j] = xi + vp[i + j];
            }
        for (; i < n; i++) {
            const $S xi = xp[i], ai = ap[i], d = xi - ai;
            acc[0] += (double)d * (double)d;
            ap[i] = ai + ws * d;
            xp[i] = xi + vp[i];
        }
    } else {
        for (; i + ACC <= n; i += ACC)
            for (int j = 0; j < ACC; j++) {
                const $S xi = xp[i + j], d = ap[i + j] - xi;
                acc[j] += (double)d * (double)d;
                xp[i + j] = xi + vp[i + j];
            }
        for (; i < n; i++) {
            const $S xi = xp[i], d = ap[i] - xi;
            acc[0] += (double)d * (double)d;
            xp[i] = xi + vp[i];
        }
    }
    double s = 0.0;
    for (int j = 0; j < ACC; j++) s += acc[j];
    return s;
}

/* Reductions of one chunk: o[0] = sum g^2, and where wd: o[1] = sum x^2, o[2] = sum g x (0
   elsewhere). Without x the chunk is read as NS interleaved sub-streams: a single read stream
   per thread leaves memory bandwidth unused. */
#define NS 4
static inline void reduce_chunk_$SUF(const $S* restrict gp, const $S* restrict xp, int64_t n,
                                     int wd, double* o) {
    double gg[NS][ACC] = {{0}}, xx[ACC] = {0}, gx[ACC] = {0};
    if (wd) {
        int64_t i = 0;
        for (; i + ACC <= n; i += ACC)
            for (int j = 0; j < ACC; j++) {
                const double gi = gp[i + j], xi = xp[i + j];
                gg[0][j] += gi * gi; xx[j] += xi * xi; gx[j] += gi * xi;
            }
        for (; i < n; i++) {
            const double gi = gp[i], xi = xp[i];
            gg[0][0] += gi * gi; xx[0] += xi * xi; gx[0] += gi * xi;
        }
    } else {
        const int64_t q = n / NS / ACC * ACC;          /* sub-stream length */
        for (int64_t i = 0; i < q; i += ACC)
            for (int s = 0; s < NS; s++)
                for (int j = 0; j < ACC; j++) {
                    const double gi = gp[s * q + i + j];
                    gg[s][j] += gi * gi;
                }
        for (int64_t i = NS * q; i < n; i++) {
            const double gi = gp[i];
            gg[0][0] += gi * gi;
        }
    }
    double s0 = 0.0, s1 = 0.0, s2 = 0.0;
    for (int j = 0; j < ACC; j++) {
        for (int s = 0; s < NS; s++) s0 += gg[s][j];
        s1 += xx[j]; s2 += gx[j];
    }
    o[0] = s0; o[1] = s1; o[2] = s2;
}
#undef NS

/* sum x^2 of one chunk, in the lanes of reduce_chunk's weight-decay branch (the same value) */
static inline double sumsq_chunk_$SUF(const $S* restrict xp, int64_t n) {
    double xx[ACC] = {0};
    int64_t i = 0;
    for (; i + ACC <= n; i += ACC)
        for (int j = 0; j < ACC; j++) { const double xi = xp[i + j]; xx[j] += xi * xi; }
    for (; i < n; i++) { const double xi = xp[i]; xx[0] += xi * xi; }
    double s = 0.0;
    for (int j = 0; j < ACC; j++) s += xx[j];
    return s;
}

/* The update of one chunk with coefficients c = (shrink, -a, -b, -b wd, lerp weight of a), in
   the eager path's order of operations:
     momentum: v <- kappa v; v <- v + (-b) g; [wd] v <- v + (-b wd) x
     x: [wd] x <- shrink x; x <- x + (-a) g
     lerp (code q_mode): a <- lerp(a, x, w) (torch's formula)
   Without a gradient (gp NULL) only v <- kappa v. */
static inline void apply_chunk_$SUF($S* restrict xp, const $S* restrict gp, $S* restrict vp,
                                    $S* restrict ap, int64_t n, const $S* c, int wd, $S k,
                                    int momentum, int lerp) {
    if (gp == NULL) {
        if (momentum)
            for (int64_t i = 0; i < n; i++) vp[i] = vp[i] * k;
        return;
    }
    const $S s = c[0], na = c[1];
    if (!momentum) {
        if (wd) {
            for (int64_t i = 0; i < n; i++) xp[i] = xp[i] * s + na * gp[i];
        } else {
            for (int64_t i = 0; i < n; i++) xp[i] = xp[i] + na * gp[i];
        }
        return;
    }
    const $S nb = c[2], nbw = c[3];
    if (wd) {
        for (int64_t i = 0; i < n; i++) {
            const $S xi = xp[i], gi = gp[i];
            $S vi = vp[i] * k;
            vi = vi + nb * gi;
            vp[i] = vi + nbw * xi;
            const $S xs = xi * s;
            xp[i] = xs + na * gi;
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            const $S gi = gp[i];
            $S vi = vp[i] * k;
            vp[i] = vi + nb * gi;
            xp[i] = xp[i] + na * gi;
        }
    }
    if (lerp) {                 /* torch.lerp's vectorized form: fma(c, x - a, base) */
        const $S w = c[4];
        const int small = w < ($S)0.5 && w > ($S)-0.5;
        const $S cf = small ? w : w - ($S)1;
        if (small) {
            for (int64_t i = 0; i < n; i++) ap[i] = $FMA(cf, xp[i] - ap[i], ap[i]);
        } else {
            for (int64_t i = 0; i < n; i++) ap[i] = $FMA(cf, xp[i] - ap[i], xp[i]);
        }
    }
}

/* The KOALA-M update of one chunk fused with the next step's predict (paper q_mode): per
   element, in the order of apply then predict:
     v' = kin v + (-b) g [+ (-b wd) x];  x' = [shrink] x + (-a) g        (the update)
     d = x' - a; sum d^2; a <- a + w d;  v <- kout v'                     (the predict)
   and x <- x' + v' (fuse_predict: yp NULL), or x <- x' and y <- x' + v' (split: the predicted
   weights into a second buffer, y; non-temporal where nt). Without a gradient (gp NULL) the
   predict only (x' = x, v' = kin v). Returns sum d^2. */
static inline __attribute__((always_inline)) double kp_body_$SUF(
        $S* restrict xp, const $S* restrict gp, $S* restrict vp, $S* restrict ap,
        $S* restrict yp, int64_t n, const $S* c, int wd, $S ki, $S ko, $S ws, const int split,
        const int nt) {
    double acc[ACC] = {0};
    const $S s = c[0], na = c[1], nb = c[2], nbw = c[3];
    int64_t i = 0;
    /* STEP: the update's x' (xn) and v' (vi) of element e; then the predict */
#define KP_TAIL(e, j)                                                     \
        const $S ai = ap[e], d = xn - ai;                                 \
        acc[j] += (double)d * (double)d;                                  \
        ap[e] = ai + ws * d;                                              \
        if (split) xp[e] = xn; else xp[e] = xn + vi;                      \
        vp[e] = vi * ko;
#define KP_LOOP(...)                                                      \
    for (; i + ACC <= n; i += ACC) {                                      \
        $S yo[ACC];                                                       \
        for (int j = 0; j < ACC; j++) {                                   \
            const int64_t e = i + j; __VA_ARGS__ KP_TAIL(e, j)            \
            if (split) { if (nt) yo[j] = xn + vi; else yp[e] = xn + vi; } \
        }                                                                 \
        if (split && nt) nt_block_$SUF(yp + i, yo);                       \
    }                                                                     \
    for (; i < n; i++) {                                                  \
        const int64_t e = i; __VA_ARGS__ KP_TAIL(e, 0)                    \
        if (split) yp[e] = xn + vi;                                       \
    }
    if (gp != NULL && wd) {
        KP_LOOP(const $S xi = xp[e], gi = gp[e];
                $S vi = vp[e] * ki; vi = vi + nb * gi; vi = vi + nbw * xi;
                const $S xs = xi * s; const $S xn = xs + na * gi;)
    } else if (gp != NULL) {
        KP_LOOP(const $S gi = gp[e];
                $S vi = vp[e] * ki; vi = vi + nb * gi;
                const $S xn = xp[e] + na * gi;)
    } else {
        KP_LOOP(const $S vi = vp[e] * ki, xn = xp[e];)
    }
#undef KP_LOOP
#undef KP_TAIL
    double sum = 0.0;
    for (int j = 0; j < ACC; j++) sum += acc[j];
    return sum;
}

static inline double apply_predict_chunk_$SUF($S* restrict xp, const $S* restrict gp,
                                              $S* restrict vp, $S* restrict ap,
                                              $S* restrict yp, int64_t n, const $S* c, int wd,
                                              $S ki, $S ko, $S ws) {
    if (yp == NULL)
        return kp_body_$SUF(xp, gp, vp, ap, NULL, n, c, wd, ki, ko, ws, 0, 0);
    if (NT_OK(yp)) {
        const double r = kp_body_$SUF(xp, gp, vp, ap, yp, n, c, wd, ki, ko, ws, 1, 1);
        NT_FENCE();
        return r;
    }
    return kp_body_$SUF(xp, gp, vp, ap, yp, n, c, wd, ki, ko, ws, 1, 0);
}

/* ---- kernels: x, v, a, g are per-tensor base pointers (g[t] NULL: no gradient); ch is the
   [nch][3] chunk table (tensor, offset, length); sums are taken per chunk and then in chunk
   order, so they do not depend on the thread count ---- */

/* KOALA-M predict over all tensors; *out = sum ||x - a||^2 (see predict_chunk). */
void koala_predict_$SUF(int64_t nch, const int64_t* ch, $S* const* x, $S* const* v,
                        $S* const* a, double* part, double* out, double w, int paper,
                        int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < nch; c++) {
        const int64_t t = ch[3 * c], off = ch[3 * c + 1];
        part[c] = predict_chunk_$SUF(x[t] + off, v[t] + off, a[t] + off, ch[3 * c + 2],
                                     ($S)w, paper);
    }
    double s = 0.0;
    for (int64_t c = 0; c < nch; c++) s += part[c];
    *out = s;
}

/* Per tensor t: out[3t..3t+2] = the reductions of reduce_chunk (all 0 where g[t] is NULL);
   part: [nch][3] scratch. */
void koala_reduce_$SUF(int64_t nch, const int64_t* ch, $S* const* g, $S* const* x,
                       const uint8_t* wd, double* part, double* out, int64_t ntensor,
                       int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < nch; c++) {
        const int64_t t = ch[3 * c], off = ch[3 * c + 1];
        if (g[t] == NULL) {
            part[3 * c] = part[3 * c + 1] = part[3 * c + 2] = 0.0;
            continue;
        }
        reduce_chunk_$SUF(g[t] + off, x[t] + off, ch[3 * c + 2], wd[t], part + 3 * c);
    }
    for (int64_t k = 0; k < 3 * ntensor; k++) out[k] = 0.0;
    for (int64_t c = 0; c < nch; c++) {
        const int64_t t = ch[3 * c];
        out[3 * t] += part[3 * c]; out[3 * t + 1] += part[3 * c + 1];
        out[3 * t + 2] += part[3 * c + 2];
    }
}

/* The update over all tensors with coefficients coef[k * ntensor + t] (see apply_chunk). */
void koala_apply_$SUF(int64_t nch, const int64_t* ch, $S* const* x, $S* const* g,
                      $S* const* v, $S* const* a, const $S* coef, const uint8_t* wd,
                      int64_t ntensor, double kappa, int momentum, int lerp, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < nch; c++) {
        const int64_t t = ch[3 * c], off = ch[3 * c + 1];
        const $S cf[5] = {coef[t], coef[ntensor + t], coef[2 * ntensor + t],
                          coef[3 * ntensor + t], coef[4 * ntensor + t]};
        apply_chunk_$SUF(x[t] + off, g[t] == NULL ? NULL : g[t] + off,
                         momentum ? v[t] + off : NULL, lerp ? a[t] + off : NULL,
                         ch[3 * c + 2], cf, wd[t], ($S)kappa, momentum, lerp);
    }
}

/* The whole update, one tensor after the other (skip="layer"): tensor t's chunks are split
   over the threads, each reduces its share, and after a barrier every thread sums the partial
   reductions in chunk order, computes t's gains from them (the same doubles in every thread,
   the formulas of _gains, operation by operation) and updates its share. The gains need no
   round trip through torch, and g (and x) are read the second time soon after the first
   (from the cache where a thread's share fits in it).
   tch: [ntensor + 1] first chunk of each tensor; wdr/wda: weight decay in the reductions / in
   the step; lr, wd: per tensor; sc: p00, p10, R, L, theta, kin, kout, w; flags: 1 momentum,
   2 relative target, 4 objective weight decay, 8 lerp (code q_mode, weight w), 16 fused
   predict (weight w; into y where y is not NULL, see kp_body). part: [nch][3], part2: [nch]
   scratch. res[0] = max_t h_t,
   res[1] = sum d^2 of the fused predict, res[2] = the objective's L2 term. */
void koala_update_$SUF(int64_t ntensor, const int64_t* tch, const int64_t* ch,
                       $S* const* x, $S* const* g, $S* const* v, $S* const* a, $S* const* y,
                       const uint8_t* wdr, const uint8_t* wda, const double* lr,
                       const double* wd, const double* sc, int64_t flags, double* part,
                       double* part2, double* res, int nt) {
    const int momentum = flags & 1, relative = (flags & 2) != 0, objective = (flags & 4) != 0;
    const int lerp = (flags & 8) != 0, fused = (flags & 16) != 0;
    const double p00 = sc[0], p10 = sc[1], R = sc[2], L = sc[3], theta = sc[4];
    const $S kin = ($S)sc[5], kout = ($S)sc[6], w = ($S)sc[7];
    const int64_t nch = tch[ntensor];
    double reg = 0.0;
    if (objective) {            /* the L2 term of the objective needs every ||x_t||^2 first */
        int any = 0;
        for (int64_t t = 0; t < ntensor; t++) any |= g[t] != NULL && wdr[t];
        if (any) {
            #pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t c = 0; c < nch; c++) {
                const int64_t t = ch[3 * c];
                part[3 * c + 1] = (g[t] != NULL && wdr[t])
                    ? sumsq_chunk_$SUF(x[t] + ch[3 * c + 1], ch[3 * c + 2]) : 0.0;
            }
            for (int64_t t = 0; t < ntensor; t++) {
                if (g[t] == NULL) continue;
                double s1 = 0.0;
                for (int64_t c = tch[t]; c < tch[t + 1]; c++) s1 += part[3 * c + 1];
                reg += (0.5 * wd[t]) * s1;
            }
        }
    }
    double hmax = 0.0;
    #pragma omp parallel num_threads(nt)
    {
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num(); nth = omp_get_num_threads();
#endif
        for (int64_t t = 0; t < ntensor; t++) {
            const int64_t c0 = tch[t], nc = tch[t + 1] - c0;
            const int64_t lo = c0 + nc * tid / nth, hi = c0 + nc * (tid + 1) / nth;
            $S cf[5] = {0, 0, 0, 0, 0};
            if (g[t] != NULL) {
                for (int64_t c = lo; c < hi; c++) {
                    const int64_t off = ch[3 * c + 1];
                    reduce_chunk_$SUF(g[t] + off, x[t] + off, ch[3 * c + 2], wdr[t],
                                      part + 3 * c);
                }
                #pragma omp barrier
                double s0 = 0.0, s1 = 0.0, s2 = 0.0;
                for (int64_t c = c0; c < c0 + nc; c++) {
                    s0 += part[3 * c]; s1 += part[3 * c + 1]; s2 += part[3 * c + 2];
                }
                const double wdt = wd[t], gn = sqrt(s0 > 0.0 ? s0 : 0.0);
                double gsq = gn * gn + (2.0 * wdt) * s2 + (wdt * wdt) * s1;
                gsq = gsq < 0.0 ? 0.0 : gsq;
                const int ok = gn >= theta;
                const double S = p00 * gsq + R;
                const double gap = relative ? lr[t] * (L + (objective ? reg
                                                             : (0.5 * wdt) * s1)) : lr[t];
                const double ga = ok ? p00 * gap / S : 0.0;
                const double gb = ok ? p10 * gap / S : 0.0;
                const double wdd = wda[t] ? wdt : 0.0;
                cf[0] = ($S)(1.0 - wdd * ga); cf[1] = ($S)(-ga);
                cf[2] = ($S)(-gb); cf[3] = ($S)(-(wdd * gb));
                cf[4] = ok ? w : ($S)0;
                if (tid == 0 && ok && gsq / S > hmax) hmax = gsq / S;
            }
            const int wflag = g[t] != NULL && wda[t];
            for (int64_t c = lo; c < hi; c++) {
                const int64_t off = ch[3 * c + 1], n = ch[3 * c + 2];
                $S* gp = g[t] == NULL ? NULL : g[t] + off;
                if (fused)
                    part2[c] = apply_predict_chunk_$SUF(x[t] + off, gp, v[t] + off, a[t] + off,
                                                        y == NULL ? NULL : y[t] + off, n, cf,
                                                        wflag, kin, kout, w);
                else
                    apply_chunk_$SUF(x[t] + off, gp, momentum ? v[t] + off : NULL,
                                     lerp ? a[t] + off : NULL, n, cf, wflag, kin, momentum,
                                     lerp);
            }
        }
    }
    double d2 = 0.0;
    if (fused)
        for (int64_t c = 0; c < nch; c++) d2 += part2[c];
    res[0] = hmax; res[1] = d2; res[2] = reg;
}
"""


def _c_source() -> str:
    parts = [_C_HEAD]
    for s, suf, fma in (("float", "f32", "fmaf"), ("double", "f64", "fma")):
        parts.append(_C_API.replace("$SUF", suf).replace("$S", s).replace("$FMA", fma))
    return "\n".join(parts)


def _ptrs(tensors) -> Tensor:
    return torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64)


class _Layout:
    """A list of same-dtype contiguous CPU tensors cut into chunks for the C kernels, and the
    per-tensor data of the current update (gradients, weight-decay flags, the rows of the
    layers with a gradient)."""

    def __init__(self, params: list, groups: list):
        self.params, self.groups = list(params), groups        # groups: param group indices
        self.dtype = params[0].dtype
        self.numels = [p.numel() for p in self.params]
        rows = [(t, s, min(_CHUNK, n - s)) for t, n in enumerate(self.numels)
                for s in range(0, n, _CHUNK)]
        self.chunks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
        self.nch = len(rows)
        self.first = torch.tensor([0] + [-(-n // _CHUNK) for n in self.numels],
                                  dtype=torch.int64).cumsum(0)   # first chunk of each tensor
        self.part = torch.empty(3 * max(self.nch, 1), dtype=_F64)
        self.part2 = torch.empty(max(self.nch, 1), dtype=_F64)
        self.grads: Optional[list] = None
        self.bufs: Optional[tuple] = None                        # see KOALA._bufs
        self.pg = self.px = None                                 # this update's pointers
        self._flags: tuple = (None, None, None, None)           # key, wd_red, wd_app, rows
        self.wd_red = self.wd_app = self.rows = None

    def matches(self, params: list) -> bool:
        """Still the tensors it was made for (``p.data`` may have been replaced)."""
        dt = self.dtype
        return all(p.dtype == dt and p.numel() == n and p.is_cpu and p.is_contiguous()
                   for p, n in zip(params, self.numels))

    def prepare(self, grads: list, group_wd: list, apply_wd: bool) -> None:
        """This update's gradients (None: no gradient), from which follow the weight-decay
        flags of the reductions and of the step (per param group) and ``rows``: where the
        update's layers (the tensors with a gradient, in order) sit (None: all of them)."""
        self.grads, self.pg, self.px = grads, _ptrs(grads), _ptrs(self.params)
        key = (tuple(g is not None for g in grads), tuple(group_wd), apply_wd)
        if key != self._flags[0]:
            has = key[0]
            red = [h and group_wd[i] for h, i in zip(has, self.groups)]
            rows = None if all(has) else torch.tensor([t for t, h in enumerate(has) if h],
                                                     dtype=torch.int64)
            self._flags = (key, torch.tensor(red, dtype=torch.uint8),
                           torch.tensor([r and apply_wd for r in red], dtype=torch.uint8), rows)
        _, self.wd_red, self.wd_app, self.rows = self._flags


class _Kernels:
    """ctypes bindings of the compiled kernels (float32 and float64 CPU tensors)."""

    def __init__(self, path: str):
        import ctypes
        lib = ctypes.CDLL(path)
        vp, i64, f64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
        self._fn = {}
        for dtype, suf in ((torch.float32, "f32"), (torch.float64, "f64")):
            fns = tuple(getattr(lib, f"koala_{k}_{suf}")
                        for k in ("predict", "reduce", "apply", "update"))
            fns[0].argtypes = [i64, vp, vp, vp, vp, vp, vp, f64, ci, ci]
            fns[1].argtypes = [i64, vp, vp, vp, vp, vp, vp, i64, ci]
            fns[2].argtypes = [i64, vp, vp, vp, vp, vp, vp, vp, i64, f64, ci, ci, ci]
            fns[3].argtypes = [i64, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, i64, vp, vp,
                               vp, ci]
            for fn in fns:
                fn.restype = None
            self._fn[dtype] = fns
        self.lib, self.path = lib, path

    def predict(self, layout: _Layout, xs: list, vs: list, avgs: list, w: float,
                paper: bool) -> Tensor:
        """x <- x + v and (paper) x_avg <- x_avg + w (x - x_avg), in place; returns
        sum ||x - x_avg||^2 over all tensors (float64, before the moves)."""
        out = torch.zeros((), dtype=_F64)
        px, pv, pa = _ptrs(xs), _ptrs(vs), _ptrs(avgs)
        self._fn[xs[0].dtype][0](layout.nch, layout.chunks.data_ptr(), px.data_ptr(),
                                 pv.data_ptr(), pa.data_ptr(), layout.part.data_ptr(),
                                 out.data_ptr(), w, int(paper), torch.get_num_threads())
        return out

    def reduce(self, layout: _Layout) -> Tensor:
        """[n, 3] float64: per tensor sum g^2, and where flagged sum x^2 and sum g x."""
        out = torch.empty(len(layout.params), 3, dtype=_F64)
        self._fn[layout.dtype][1](
            layout.nch, layout.chunks.data_ptr(), layout.pg.data_ptr(), layout.px.data_ptr(),
            layout.wd_red.data_ptr(), layout.part.data_ptr(), out.data_ptr(),
            len(layout.params), torch.get_num_threads())
        return out

    def apply(self, layout: _Layout, xs: list, vs: Optional[list], avgs: Optional[list],
              coefs: Tensor, kappa: float, momentum: bool, lerp: bool) -> None:
        """The update with the [5, n] coefficients (see the C source), in place."""
        pg, px = layout.pg, layout.px if xs is layout.params else _ptrs(xs)
        pv = _ptrs(vs) if vs is not None else None
        pa = _ptrs(avgs) if avgs is not None else None
        self._fn[xs[0].dtype][2](
            layout.nch, layout.chunks.data_ptr(), px.data_ptr(), pg.data_ptr(),
            None if pv is None else pv.data_ptr(), None if pa is None else pa.data_ptr(),
            coefs.data_ptr(), layout.wd_app.data_ptr(), len(xs), kappa, int(momentum),
            int(lerp), torch.get_num_threads())
        layout.grads = layout.pg = layout.px = None

    def update(self, layout: _Layout, vs: Optional[list], avgs: Optional[list], lr: Tensor,
               wd: Tensor, scalars: Tensor, flags: int, ys: Optional[list] = None) -> Tensor:
        """The whole update tensor by tensor (``koala_update`` in the C source), in place;
        returns [max_l h_l, sum d^2 of the fused predict, the objective's L2 term] (float64)."""
        res = torch.zeros(3, dtype=_F64)
        pv = _ptrs(vs) if vs is not None else None
        pa = _ptrs(avgs) if avgs is not None else None
        py = _ptrs(ys) if ys is not None else None
        self._fn[layout.dtype][3](
            len(layout.params), layout.first.data_ptr(), layout.chunks.data_ptr(),
            layout.px.data_ptr(), layout.pg.data_ptr(), None if pv is None else pv.data_ptr(),
            None if pa is None else pa.data_ptr(), None if py is None else py.data_ptr(),
            layout.wd_red.data_ptr(),
            layout.wd_app.data_ptr(), lr.data_ptr(), wd.data_ptr(), scalars.data_ptr(), flags,
            layout.part.data_ptr(), layout.part2.data_ptr(), res.data_ptr(),
            torch.get_num_threads())
        layout.grads = layout.pg = layout.px = None
        return res


_NATIVE: dict = {}               # "kernels": _Kernels | None once tried, "error": why not
_NATIVE_LOCK = threading.Lock()


def _build() -> str:
    """Compile the kernels (or find them compiled) and return the path of the shared object."""
    return _native.build("koala", _c_source(), ["-O3", "-fno-math-errno", "-ffp-contract=off",
                                                "-shared", "-fPIC"])


def _self_check(k: _Kernels) -> None:
    """The kernels against torch on a few tensors, one of several chunks (a miscompiled
    kernel must not reach an optimizer)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13,
                                                                              atol=1e-13)

        def rnd(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        shapes = [(3, 5), (2 * _CHUNK + 37,), (1,), (40,)]
        xs, vs, avgs, gs = ([rnd(*s) for s in shapes] for _ in range(4))
        gs[3] = None                                       # a tensor without a gradient
        layout = _Layout(xs, [0, 1, 0, 0])                 # tensor 1: no weight decay
        x0, v0, a0 = ([t.clone() for t in ts] for ts in (xs, vs, avgs))
        for paper in (True, False):
            xs_, as_ = [t.clone() for t in x0], [t.clone() for t in a0]
            s = k.predict(layout, xs_, vs, as_, 0.1, paper).item()
            ref = sum(((x - a).double() ** 2).sum().item() for x, a in zip(x0, a0))
            ok = abs(s - ref) <= 1e-12 * ref and all(
                torch.allclose(x, x_ + v, **tol) for x, x_, v in zip(xs_, x0, vs))
            ok = ok and all(torch.allclose(a, (a_ + 0.1 * (x_ - a_)) if paper else a_, **tol)
                            for a, a_, x_ in zip(as_, a0, x0))
            if not ok:
                raise RuntimeError(f"self-check failed (predict, {dtype})")
        layout.prepare(gs, [True, False], True)
        out = k.reduce(layout)
        for t, (x, g) in enumerate(zip(x0, gs)):
            ref = [0.0, 0.0, 0.0] if g is None else [
                (g.double() ** 2).sum().item(),
                (x.double() ** 2).sum().item() if t != 1 else 0.0,
                (g.double() * x.double()).sum().item() if t != 1 else 0.0]
            if not torch.allclose(out[t], torch.tensor(ref, dtype=_F64), rtol=1e-12,
                                  atol=1e-12):
                raise RuntimeError(f"self-check failed (reduce, {dtype})")
        coefs = rnd(5, len(xs)) * 0.1
        coefs[0] += 1.0
        coefs[4, 2] = 0.7                                  # the other branch of lerp
        for momentum, lerp in ((True, True), (False, False)):
            layout.prepare(gs, [True, False], True)
            xs_, vs_, as_ = ([t.clone() for t in ts] for ts in (x0, v0, a0))
            k.apply(layout, xs_, vs_ if momentum else None, as_ if lerp else None, coefs,
                    0.9, momentum, lerp)
            for t in range(len(xs)):
                x, v, a, g = x0[t], v0[t], a0[t], gs[t]
                s_, na, nb, nbw, w = coefs[:, t]
                if g is None:
                    ref_x, ref_v, ref_a = x, v * 0.9, a
                else:
                    ref_v = v * 0.9 + nb * g + (nbw * x if t != 1 else 0.0)
                    ref_x = (x * s_ if t != 1 else x) + na * g
                    ref_a = torch.lerp(a, ref_x, w) if lerp else a
                ok = torch.allclose(xs_[t], ref_x, **tol)
                ok = ok and (not momentum or torch.allclose(vs_[t], ref_v, **tol))
                ok = ok and torch.allclose(as_[t], ref_a, **tol)
                if not ok:
                    raise RuntimeError(f"self-check failed (apply, {dtype})")
        _self_check_update(k, layout, gs, x0, v0, a0, rnd, tol)


def _self_check_update(k: _Kernels, layout: _Layout, gs: list, x0: list, v0: list, a0: list,
                       rnd, tol: dict) -> None:
    """``koala_update`` against reduce, :func:`_gains` and apply (fused: then predict and
    v <- kappa v; split: then predict into a copy of the weights)."""
    dtype = layout.dtype
    P_hat = torch.tensor([[0.3, 0.05], [0.04, 0.2]], dtype=_F64)
    R, L, theta = torch.tensor(0.7, dtype=_F64), torch.tensor(1.3, dtype=_F64), 1e-9
    lr = torch.tensor([1.0, 0.5, 1.0, 1.0], dtype=_F64)
    wd = torch.tensor([0.05, 0.0, 0.05, 0.05], dtype=_F64)
    rows = [t for t, g in enumerate(gs) if g is not None]
    for momentum, objective, lerp, predict in ((True, True, False, ""), (True, False, True, ""),
                                               (True, True, False, "fused"),
                                               (True, False, False, "split"),
                                               (False, True, False, "")):
        layout.prepare(gs, [True, False], True)
        out = k.reduce(layout)[rows]
        gn = out[:, 0].clamp_min(0.0).sqrt()
        coefs, h_max = _gains(gn, out[:, 1], out[:, 2], lr[rows], wd[rows],
                              P_hat if momentum else P_hat[0, 0], R, L, gn >= theta,
                              momentum=momentum, relative=True, objective=objective,
                              wd_in_step=True, lerp_w=0.1 if lerp else None)
        cols = torch.zeros(5, len(gs), dtype=_F64)
        cols[:len(coefs), rows] = torch.stack(coefs)
        cols = cols.to(dtype).contiguous()
        ref = [[t.clone() for t in ts] for ts in (x0, v0, a0)]
        ref_d2 = 0.0
        k.apply(layout, ref[0], ref[1] if momentum else None, ref[2] if lerp else None,
                cols, 0.9, momentum, lerp)
        if predict == "fused":              # x = x' + v', the average moved, v = kappa v'
            ref_d2 = k.predict(layout, ref[0], ref[1], ref[2], 0.1, True).item()
            ref[1] = [v * 0.9 for v in ref[1]]
        if predict == "split":              # y = x' + v', the average moved; x' and v' stay
            ref.append([t.clone() for t in ref[0]])
            ref_d2 = k.predict(layout, ref[3], ref[1], ref[2], 0.1, True).item()
        got = [[t.clone() for t in ts] for ts in (x0, v0, a0)]
        ys = None
        if predict == "split":
            ys = [torch.full_like(t, float("nan")) for t in x0]
            ys[1] = torch.full((x0[1].numel() + 1,), float("nan"), dtype=dtype)[1:]  # unaligned:
            got.append(ys)                                               # plain stores
        mine = _Layout(got[0], layout.groups)
        mine.prepare(gs, [True, False], True)
        sc = torch.tensor([P_hat[0, 0], P_hat[1, 0] if momentum else 0.0, R, L, theta, 0.9,
                           1.0 if predict == "split" else 0.9, 0.1], dtype=_F64)
        flags = (int(momentum) | 2 | int(objective) << 2 | int(lerp) << 3
                 | int(bool(predict)) << 4)
        res = k.update(mine, got[1] if momentum else None,
                       got[2] if lerp or predict else None, lr, wd, sc, flags, ys)
        ok = abs(res[0].item() - h_max.item()) <= 1e-12 * abs(h_max.item())
        ok = ok and (not predict or abs(res[1].item() - ref_d2) <= 1e-12 * abs(ref_d2))
        for r, g in zip(ref, got):
            ok = ok and all(torch.allclose(x, y, **tol) for x, y in zip(r, g))
        if not ok:
            raise RuntimeError(f"self-check failed (update, {dtype})")


def _native_kernels() -> Optional[_Kernels]:
    """The compiled kernels, built on first use; None where they cannot be had."""
    def make() -> _Kernels:
        kernels = _Kernels(_build())
        _self_check(kernels)
        return kernels
    return _native.load_once(_NATIVE, _NATIVE_LOCK, "SSL_SUITE_KOALA_NATIVE", make)


def _warn_native_once() -> None:
    if _NATIVE.pop("warn", False):
        warnings.warn(f"KOALA: C kernels unavailable ({_NATIVE.get('error')}); using torch "
                      "kernels", RuntimeWarning, stacklevel=4)


# Loops for torch.compile (one fused kernel per tensor per pass); ``work`` holds one tuple.
def _predict_loop(work) -> None:
    for params, vels, avgs, out, avg_w, kappa in work:
        for i, (p, v, a) in enumerate(zip(params, vels, avgs)):
            d = p - a
            out[i] = (d * d).sum()
            if avg_w != 0.0:
                a.copy_(a + avg_w * d)
            p.copy_(p + v)
            v.copy_(v * kappa)


def _reduce_loop(work) -> None:
    for grads, params, out in work:
        for i, (g, p) in enumerate(zip(grads, params)):
            out[i] = torch.stack([(g * g).sum(), (p * p).sum(), (g * p).sum()])


def _apply_v_loop(work) -> None:
    for params, grads, shrink, neg_a in work:
        for p, g, s, c in zip(params, grads, shrink, neg_a):
            p.copy_(p * s + g * c)


def _apply_m_loop(work) -> None:
    for params, grads, vels, avgs, shrink, neg_a, neg_b, neg_bwd, avg_w in work:
        for i, (p, g, v) in enumerate(zip(params, grads, vels)):
            v.copy_(v + g * neg_b[i] + p * neg_bwd[i])
            p_new = p * shrink[i] + g * neg_a[i]
            p.copy_(p_new)
            if avgs is not None:
                avgs[i].copy_(torch.lerp(avgs[i], p_new, avg_w[i]))


_COMPILED_PREDICT = CompiledLoop(_predict_loop, "KOALA")
_COMPILED_REDUCE = CompiledLoop(_reduce_loop, "KOALA")
_COMPILED_APPLY_V = CompiledLoop(_apply_v_loop, "KOALA")
_COMPILED_APPLY_M = CompiledLoop(_apply_m_loop, "KOALA")


class KOALAV(KOALA):
    """KOALA-V (vanilla): scalar P, constant Q = q. See :mod:`ssl_suite.optim.koala`."""

    def __init__(self, params, lr: float = 1.0, weight_decay: float = 0.0, sigma: float = 0.1,
                 q: float = 1.0, r: Optional[float] = None, r_beta: float = 0.9,
                 r_init: float = 1.0, r_mode: str = "paper", target: str = "relative",
                 wd_mode: str = "objective", skip: str = "layer", skip_threshold: float = 1e-9,
                 foreach: Optional[bool] = None, compile: Optional[bool] = None,
                 native: Optional[bool] = None):
        super().__init__(params, lr=lr, variant="v", weight_decay=weight_decay, sigma=sigma, q=q,
                         r=r, r_beta=r_beta, r_init=r_init, r_mode=r_mode, target=target,
                         wd_mode=wd_mode, skip=skip, skip_threshold=skip_threshold,
                         foreach=foreach, compile=compile, native=native)


class KOALAM(KOALA):
    """KOALA-M (momentum): 2x2 P over (x, v), predict before the closure. See
    :mod:`ssl_suite.optim.koala`."""

    def __init__(self, params, lr: float = 1.0, weight_decay: float = 0.0, sw: float = 0.1,
                 sc: float = 0.0, sv: float = 0.1, kappa: float = 0.9, qw: float = 1e-2,
                 qv: float = 1e-2, q_mode: str = "paper", avg_beta: float = 0.9,
                 q_beta: float = 0.9, r: Optional[float] = None, r_beta: float = 0.9,
                 r_init: float = 1.0, r_mode: str = "paper", target: str = "relative",
                 wd_mode: str = "objective", skip: str = "layer", skip_threshold: float = 1e-9,
                 foreach: Optional[bool] = None, compile: Optional[bool] = None,
                 native: Optional[bool] = None, fuse_predict: bool = False,
                 predict_buffer: bool = True):
        super().__init__(params, lr=lr, variant="m", weight_decay=weight_decay, sw=sw, sc=sc,
                         sv=sv, kappa=kappa, qw=qw, qv=qv, q_mode=q_mode, avg_beta=avg_beta,
                         q_beta=q_beta, r=r, r_beta=r_beta, r_init=r_init, r_mode=r_mode,
                         target=target, wd_mode=wd_mode, skip=skip,
                         skip_threshold=skip_threshold, foreach=foreach, compile=compile,
                         native=native, fuse_predict=fuse_predict,
                         predict_buffer=predict_buffer)
