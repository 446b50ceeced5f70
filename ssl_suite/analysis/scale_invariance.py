"""Scale-invariant (SI) parameters: detection, a numerical check, and the fully-SI conversion.

A weight ``w`` is scale-invariant when the network function satisfies ``f(c w) = f(w)`` for every
``c > 0`` (Kodryan, Lobacheva, Nakhodnov & Vetrov, "Training Scale-Invariant Neural Networks on the
Sphere Can Happen in Three Regimes", NeurIPS 2022, Sec. 2; spec
``shared/algorithms/init_prune_norm_largebatch.md`` Sec. 5.1). The usual source is a convolution or
linear layer whose output goes straight into a normalization layer: BatchNorm in *train mode*
normalises each channel by its batch mean and std, ``BN(c z) = (c z - c mu) / (c sigma) = BN(z)``
(Ioffe & Szegedy 2015, Alg. 1; up to the ``eps`` in the denominator). BN per channel makes every
output filter separately SI (``granularity="unit"``); a GroupNorm/LayerNorm over several channels only
makes the whole tensor SI (``granularity="tensor"``). In eval mode BN divides by its *running*
statistics, so the function is SI only after the running statistics are re-estimated
(:func:`ssl_suite.optim.replica_sgd.recompute_bn_stats`); the invariance that shapes training is the
train-mode one, and that is what :func:`is_scale_invariant` checks.

Two structural detections:

* traced (``example_input_fn`` given): one forward pass in train mode records, through forward
  hooks, the autograd node of every Conv/Linear output; then the autograd graph is walked forward
  from that node. The weight is SI when every path reaches a normalization node (BatchNorm,
  GroupNorm, LayerNorm, RMSNorm) before the model output, passing only through positively
  homogeneous unary ops (views, ReLU, pooling, dropout) on the way, and when the weight itself
  feeds nothing but that layer's own calls (no tying, no functional reuse). A layer bias is allowed
  only directly in front of BatchNorm (a per-channel constant that the batch mean removes). Running
  statistics, ``requires_grad`` flags, train/eval modes and the RNG are restored afterwards.
* module order (no input): the next atomic module after a Conv/Linear, in registration order, is a
  norm layer over its output channels. It needs no forward pass and is right for the common
  patterns (``conv-bn-relu``, timm's ResNets, ``linear-LN``), but it cannot see the data flow:
  a residual that also uses the conv output, or a functional op between conv and norm, fools it.

:func:`is_scale_invariant` is the ground truth for one parameter (``f(c w)`` against ``f(w)``).
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["SIParam", "WEIGHT_LAYERS", "NORM_LAYERS", "scale_invariant_info",
           "scale_invariant_params", "is_scale_invariant", "report", "make_fully_scale_invariant"]

#: Layers whose ``weight`` can be scale-invariant.
WEIGHT_LAYERS: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Normalization layers that make the weight in front of them scale-invariant.
NORM_LAYERS: tuple[type, ...] = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm,
                                 *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))

_NORM_NODE = re.compile(r"(BatchNorm|GroupNorm|LayerNorm|RmsNorm)Backward")
# Positively homogeneous of degree 1 (g(c z) = c g(z) for c > 0) and unary: scale passes through.
_HOMOGENEOUS_NODE = re.compile(
    r"^(View|UnsafeView|Reshape(Alias)?|Permute|Transpose|T|Expand|Squeeze|Unsqueeze|Clone|"
    r"Contiguous|Alias|Flatten|Select|Slice|Narrow|Relu|LeakyRelu|"
    r"MaxPool\dDWithIndices|AvgPool\dD|AdaptiveAvgPool\dD|AdaptiveMaxPool\dD|Mean|Sum|"
    r"NativeDropout|Pad|ConstantPadNd|ReflectionPad\dD|ReplicationPad\dD)Backward\d*$")


@dataclass
class SIParam:
    """One scale-invariant weight: its name, the layer that owns it, the norm layer that makes it
    SI (module name; empty when only the graph node is known), and ``granularity``: ``"unit"``
    (every output filter is SI on its own, BN/InstanceNorm directly on the output) or
    ``"tensor"`` (only the whole tensor is)."""

    name: str
    module: str
    norm: str
    granularity: str
    numel: int
    shape: tuple[int, ...]


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _norm_channels(m: nn.Module) -> Optional[int]:
    if isinstance(m, (_BatchNorm, _InstanceNorm)):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    shape = getattr(m, "normalized_shape", None)
    return int(shape[0]) if shape else None


def _granularity(norm: nn.Module, direct: bool) -> str:
    if not direct:
        return "tensor"
    if isinstance(norm, (_BatchNorm, _InstanceNorm)):
        return "unit"
    if isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels:
        return "unit"
    return "tensor"


def _bias_ok(layer: nn.Module, norm: Optional[nn.Module]) -> bool:
    # A per-output-channel bias is removed by a per-channel mean (BatchNorm), not by GN/LN.
    return getattr(layer, "bias", None) is None or isinstance(norm, _BatchNorm)


def _tied(model: nn.Module) -> set[int]:
    count: dict[int, int] = defaultdict(int)
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] += 1
    return {k for k, v in count.items() if v > 1}


def _atomic_modules(model: nn.Module, prefix: str = ""):
    """Modules in registration order, not descending into weight or norm layers (timm's
    ``BatchNormAct2d`` holds its activation as a child)."""
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, WEIGHT_LAYERS + NORM_LAYERS) or not list(child.children()):
            yield full, child
        else:
            yield from _atomic_modules(child, full + ".")


def _by_module_order(model: nn.Module) -> list[SIParam]:
    skip = (nn.Identity, nn.Dropout)
    atoms = [(n, m) for n, m in _atomic_modules(model) if not isinstance(m, skip)]
    tied, out = _tied(model), []
    for (name, layer), nxt in zip(atoms, atoms[1:] + [(None, None)]):
        if not isinstance(layer, WEIGHT_LAYERS) or nxt[1] is None:
            continue
        norm_name, norm = nxt
        if not isinstance(norm, NORM_LAYERS) or _norm_channels(norm) != _out_channels(layer):
            continue
        if id(layer.weight) in tied or not _bias_ok(layer, norm):
            continue
        w = layer.weight
        out.append(SIParam(f"{name}.weight", name, norm_name, _granularity(norm, True),
                           w.numel(), tuple(w.shape)))
    return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


class _Preserved:
    """Restores buffers, requires_grad flags, train/eval modes and the RNG on exit."""

    def __init__(self, model: nn.Module, train: bool, grad: bool):
        self.model, self.train, self.grad = model, train, grad

    def __enter__(self):
        m = self.model
        self.buffers = {k: b.detach().clone() for k, b in m.named_buffers()}
        self.modes = [(mod, mod.training) for mod in m.modules()]
        self.flags = [(p, p.requires_grad) for p in m.parameters()]
        cuda = sorted({p.device.index or 0 for p in m.parameters() if p.is_cuda})
        self.rng = torch.random.fork_rng(devices=cuda)
        self.rng.__enter__()
        m.train(self.train)
        if self.grad:
            for p in m.parameters():
                p.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        self.rng.__exit__(*exc)
        with torch.no_grad():
            for k, b in self.model.named_buffers():
                b.copy_(self.buffers[k])
        for mod, mode in self.modes:
            mod.training = mode
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _traced(model: nn.Module, example_input_fn: Callable[[], Any]) -> list[SIParam]:
    names = {m: n for n, m in model.named_modules()}
    outputs: dict[nn.Module, list] = defaultdict(list)   # layer -> output grad_fn per call
    norm_inputs: dict[int, nn.Module] = {}               # id(input grad_fn) -> norm module
    keep = []                                            # keeps graph nodes alive (stable ids)

    def layer_hook(mod, _inp, out):
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            outputs[mod].append(out.grad_fn)

    def norm_hook(mod, inp):
        if inp and isinstance(inp[0], torch.Tensor) and inp[0].grad_fn is not None:
            keep.append(inp[0].grad_fn)
            norm_inputs[id(inp[0].grad_fn)] = mod

    handles = []
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS):
            handles.append(m.register_forward_hook(layer_hook))
        elif isinstance(m, NORM_LAYERS):
            handles.append(m.register_forward_pre_hook(norm_hook))
    try:
        with _Preserved(model, train=True, grad=True), torch.enable_grad():
            out = model(example_input_fn())
    finally:
        for h in handles:
            h.remove()
    roots = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
    if not roots:
        raise ValueError("scale_invariant_params: the model output has no autograd graph")

    # consumers[id(node)] = nodes that take node's output as input (the forward direction)
    consumers: dict[int, list] = defaultdict(list)
    acc: dict[int, Any] = {}                        # id(param) -> its AccumulateGrad node
    seen, queue = {id(r): r for r in roots}, deque(roots)
    while queue:
        node = queue.popleft()
        var = getattr(node, "variable", None)
        if var is not None:
            acc[id(var)] = node
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            consumers[id(nxt)].append(node)
            if id(nxt) not in seen:
                seen[id(nxt)] = nxt
                queue.append(nxt)
    root_ids = {id(r) for r in roots}

    def reaches_root(start, stop: Callable[[Any], bool]) -> tuple[bool, list]:
        """Walk forward from ``start``; a path ends at a node with ``stop``. Returns whether some
        path reaches a model output without stopping, and the nodes where paths stopped."""
        stopped, todo, visited = [], [start], {id(start)}
        while todo:
            node = todo.pop()
            if id(node) in root_ids and node is not start:
                return True, stopped
            for c in consumers.get(id(node), []):
                if id(c) in visited:
                    continue
                visited.add(id(c))
                if stop(c):
                    stopped.append(c)
                else:
                    todo.append(c)
        return id(start) in root_ids, stopped

    tied, found = _tied(model), []
    for layer, nodes in outputs.items():
        w = layer.weight
        nodes = [n for n in nodes if id(n) in seen]
        if not nodes or id(w) in tied or id(w) not in acc:
            continue
        ok, norm_mod, direct = True, None, True
        for node in nodes:
            # 1. the output reaches the model output only through a normalization node,
            #    and only through homogeneous unary ops before it
            reached, norms = reaches_root(node, _is_norm_node)
            if reached or not norms:
                ok = False
                break
            path_ok = _only_homogeneous(node, consumers)
            if not path_ok:
                ok = False
                break
            mod = norm_inputs.get(id(node))
            if mod is None:
                direct = False
                mod = next((norm_inputs[k] for k in _path_ids(node, consumers)
                            if k in norm_inputs), None)
            norm_mod = norm_mod or mod
        if not ok or not _bias_ok(layer, norm_mod if direct else None):
            continue
        # 2. the weight feeds nothing but this layer's own calls
        call_ids = {id(n) for n in nodes}
        reached, _ = reaches_root(acc[id(w)], lambda c: id(c) in call_ids)
        if reached:
            continue
        gran = _granularity(norm_mod, direct) if norm_mod is not None else "tensor"
        found.append(SIParam(f"{names[layer]}.weight", names[layer],
                             names.get(norm_mod, "") if norm_mod is not None else "",
                             gran, w.numel(), tuple(w.shape)))
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    found.sort(key=lambda s: order.get(s.name, 0))
    return found


def _is_norm_node(node) -> bool:
    return bool(_NORM_NODE.search(type(node).__name__))


def _only_homogeneous(node, consumers) -> bool:
    """Every node strictly between ``node`` and the first norm node is homogeneous and unary."""
    todo, visited = [node], {id(node)}
    while todo:
        cur = todo.pop()
        for c in consumers.get(id(cur), []):
            if _is_norm_node(c) or id(c) in visited:
                continue
            if not _HOMOGENEOUS_NODE.match(type(c).__name__):
                return False
            visited.add(id(c))
            todo.append(c)
    return True


def _path_ids(node, consumers) -> list[int]:
    out, todo = [], [node]
    while todo:
        cur = todo.pop()
        for c in consumers.get(id(cur), []):
            if not _is_norm_node(c):
                out.append(id(c))
                todo.append(c)
    return out


def scale_invariant_info(model: nn.Module,
                         example_input_fn: Optional[Callable[[], Any]] = None) -> list[SIParam]:
    """The scale-invariant Conv/Linear weights of ``model`` (in parameter order), traced through
    one forward pass of ``example_input_fn()`` when given, else by module order (module doc)."""
    if example_input_fn is None:
        return _by_module_order(model)
    return _traced(model, example_input_fn)


def scale_invariant_params(model: nn.Module,
                           example_input_fn: Optional[Callable[[], Any]] = None) -> list[str]:
    """Names of the scale-invariant weights of ``model`` (see :func:`scale_invariant_info`)."""
    return [s.name for s in scale_invariant_info(model, example_input_fn)]


@torch.no_grad()
def is_scale_invariant(model: nn.Module, name: str, inputs: Any, scale: float = 3.0,
                       per: str = "tensor", rtol: float = 1e-3, train: bool = True,
                       seed: int = 0) -> bool:
    """Numerical check of ``f(c w) = f(w)`` for the parameter ``name`` (Kodryan et al. 2022,
    Sec. 2 definition of scale invariance), with BatchNorm in train mode (``train=True``: batch
    statistics, running statistics restored afterwards) or eval mode.

    ``per="tensor"`` multiplies the whole tensor by ``scale``; ``per="unit"`` multiplies each output
    filter (first dim) by its own factor drawn from ``[1/scale, scale]``, which tests per-filter
    invariance. True when ``||f(c w) - f(w)|| <= rtol * ||f(w)||`` for every output tensor. Dropout
    draws the same mask in both passes (the RNG is reset to ``seed``)."""
    p = dict(model.named_parameters())[name]
    x = inputs() if callable(inputs) else inputs

    def run():
        torch.manual_seed(seed)
        return [t.detach().clone() for t in _tensors(model(x))]

    with _Preserved(model, train=train, grad=False):
        ref = run()
        original = p.detach().clone()
        if per == "unit" and p.ndim >= 1:
            g = torch.Generator().manual_seed(seed)
            logc = (torch.rand(p.shape[0], generator=g) * 2 - 1) * torch.log(torch.tensor(scale))
            c = logc.exp().to(p).view(-1, *([1] * (p.ndim - 1)))
        elif per == "tensor":
            c = torch.tensor(scale, dtype=p.dtype, device=p.device)
        else:
            raise ValueError(f"per must be 'tensor' or 'unit', got {per!r}")
        try:
            p.mul_(c)
            new = run()
        finally:
            p.copy_(original)
    return all(float((a - b).norm()) <= rtol * max(float(a.norm()), 1e-12)
               for a, b in zip(ref, new))


def report(model: nn.Module, example_input_fn: Optional[Callable[[], Any]] = None,
           print_fn: Optional[Callable[[str], None]] = print) -> list[SIParam]:
    """Print (with ``print_fn``; None for silence) a table of the scale-invariant weights and the
    trainable parameters that are not SI, and return the SI list."""
    info = scale_invariant_info(model, example_input_fn)
    if print_fn is not None:
        si = {s.name for s in info}
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_si = sum(s.numel for s in info)
        print_fn(f"{'parameter':40s} {'shape':>18s} {'normalized by':24s} granularity")
        for s in info:
            print_fn(f"{s.name:40s} {str(s.shape):>18s} {s.norm:24s} {s.granularity}")
        rest = [n for n, p in model.named_parameters() if p.requires_grad and n not in si]
        print_fn(f"{len(info)} SI weights, {n_si}/{total} trainable parameters "
                 f"({100.0 * n_si / max(total, 1):.1f}%); not SI: {', '.join(rest) or '-'}")
    return info


@torch.no_grad()
def make_fully_scale_invariant(model: nn.Module,
                               example_input_fn: Optional[Callable[[], Any]] = None,
                               last_layer: Optional[str] = None, last_layer_norm: float = 10.0,
                               seed: Optional[int] = 228, freeze_rest: bool = True) -> dict:
    """Turn ``model`` in place into a fully scale-invariant network, as Kodryan et al. (2022)
    do for ConvNetSI / ResNet18SI (code ``tipt0p/three_regimes_on_the_sphere`` ``nets/``,
    ``train.py``; spec Sec. 5.2):

    * every BatchNorm loses its affine parameters (``affine=False``);
    * a Conv/Linear bias in front of a BatchNorm is removed (BN's mean removes it anyway in train
      mode; the BN running mean is shifted by ``-bias`` so eval mode is unchanged);
    * the last linear layer (``last_layer``, default the last ``nn.Linear`` in module order) is
      re-initialised (torch default init under ``seed``, the code's ``--same_last_layer``; None
      keeps the current weight), rescaled to Frobenius norm ``last_layer_norm`` (the code's
      ``init_scale = 10``) and frozen, with its bias (the code's ``noninvlr = 0``);
    * with ``freeze_rest``, every other trainable parameter that is not SI is frozen, so every
      trainable parameter is SI ("fully SI").

    The function is unchanged at PyTorch's default init (BN gamma = 1, beta = 0) except for the
    re-initialised last layer; ``function_preserved`` in the result says whether every removed
    gamma/beta was 1/0. Returns what changed: ``bn_affine_removed``, ``bias_removed``,
    ``last_layer``, ``frozen`` and the final ``scale_invariant`` names. Build the optimizer
    afterwards."""
    info = scale_invariant_info(model, example_input_fn)
    modules = dict(model.named_modules())
    changed: dict[str, Any] = {"bn_affine_removed": [], "bias_removed": [], "frozen": [],
                               "function_preserved": True}
    for s in info:
        layer, norm = modules[s.module], modules.get(s.norm)
        if getattr(layer, "bias", None) is not None and isinstance(norm, _BatchNorm):
            if norm.track_running_stats and norm.running_mean is not None and \
                    norm.running_mean.shape == layer.bias.shape:
                norm.running_mean.sub_(layer.bias.detach())
            layer.bias = None
            changed["bias_removed"].append(f"{s.module}.bias")
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.affine:
            if not (torch.all(m.weight == 1) and torch.all(m.bias == 0)):
                changed["function_preserved"] = False
            m.weight, m.bias, m.affine = None, None, False
            changed["bn_affine_removed"].append(name)
    if last_layer is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        last_layer = linears[-1] if linears else None
    if last_layer is not None:
        fc = modules[last_layer]
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                fc.reset_parameters()
            changed["function_preserved"] = False
        fc.weight.mul_(last_layer_norm / fc.weight.norm())
        for pname, p in fc.named_parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                changed["frozen"].append(f"{last_layer}.{pname}")
    changed["last_layer"] = last_layer
    si = scale_invariant_params(model, example_input_fn)
    if freeze_rest:
        for n, p in model.named_parameters():
            if p.requires_grad and n not in si:
                p.requires_grad_(False)
                changed["frozen"].append(n)
    changed["scale_invariant"] = [n for n in si if dict(model.named_parameters())[n].requires_grad]
    return changed
