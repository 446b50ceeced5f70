"""Typed experiment configuration: dataclasses, YAML loading, dotted overrides, validation.

Every YAML key maps to a typed dataclass field. Loading a file plus ``key=value`` overrides
either returns a fully validated :class:`Config` or raises :class:`ConfigError` with one line
that names the offending key and what is allowed, e.g.::

    config error: train.precision: 'fp8' is not one of 'no', 'bf16', 'fp16', 'auto'

Ranges live in the field metadata (``min``, ``max``, ``min_exclusive``, ``max_exclusive``) so
that the check and the documentation are the same data.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is one line naming the key."""


def _f(default: Any = dataclasses.MISSING, *, help: str = "", **limits: Any) -> Any:
    """Field with documentation and range limits kept in its metadata."""
    meta = {"help": help, **limits}
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, tuple):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _sub(cls: type) -> Any:
    return field(default_factory=cls, metadata={"help": cls.__doc__ or ""})


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class DataConfig:
    """Where images come from (ssl_suite/data)."""

    name: Literal["digits", "cifar10", "cifar100", "stl10", "imagefolder"] = _f(
        "digits", help="dataset; digits ships with scikit-learn (no download)")
    root: Optional[str] = _f(None, help="dataset folder (not used by digits)")
    download: bool = _f(False, help="let torchvision download cifar/stl10 into root")
    image_size: int = _f(32, min=8, max=1024,
                         help="stored side length: digits are upsampled to it, imagefolder "
                              "images are decoded to it (resize shorter side, centre crop)")
    test_root: Optional[str] = _f(None, help="imagefolder: labelled test folder for kNN")
    holdout_fraction: float = _f(0.1, min=0.0, max=0.5,
                                 help="imagefolder without test_root: labelled fraction held out")
    on_corrupt: Literal["skip", "error"] = _f(
        "skip", help="imagefolder: skip unreadable images (counted in the log) or stop")
    num_workers: int = _f(4, min=0, max=256, help="decode workers for imagefolder")
    knn_train_limit: Optional[int] = _f(None, min=1,
                                        help="cap on labelled images used as kNN memory bank")
    label_fraction: float = _f(0.1, min_exclusive=0.0, max=1.0,
                               help="finetune: class-balanced fraction of the labels (seeded)")
    label_split_file: Optional[str] = _f(
        None, help="finetune: file listing the labelled images (SimCLR 1%/10% split files)")


@dataclass
class ViewConfig:
    """One augmentation distribution (BYOL paper, App. B, Table 6)."""

    crop_scale: tuple[float, float] = _f((0.08, 1.0), min=0.0, max=1.0,
                                         help="random resized crop area fraction")
    crop_ratio: tuple[float, float] = _f((3 / 4, 4 / 3), min_exclusive=0.0,
                                         help="crop aspect ratio range (log-uniform)")
    flip_prob: float = _f(0.5, min=0.0, max=1.0)
    jitter_prob: float = _f(0.8, min=0.0, max=1.0)
    brightness: float = _f(0.4, min=0.0, max=1.0, help="additive delta U[-b, b]")
    contrast: float = _f(0.4, min=0.0, max=1.0, help="factor U[1-c, 1+c] around channel mean")
    saturation: float = _f(0.2, min=0.0, max=1.0, help="factor U[1-s, 1+s]")
    hue: float = _f(0.1, min=0.0, max=0.5, help="hue delta U[-h, h] (fraction of a turn)")
    grayscale_prob: float = _f(0.2, min=0.0, max=1.0)
    blur_prob: float = _f(1.0, min=0.0, max=1.0)
    blur_sigma: tuple[float, float] = _f((0.1, 2.0), min_exclusive=0.0)
    blur_kernel_frac: float = _f(0.1, min_exclusive=0.0, max=1.0,
                                 help="blur kernel side as a fraction of the image side")
    solarize_prob: float = _f(0.0, min=0.0, max=1.0)
    solarize_threshold: float = _f(0.5, min=0.0, max=1.0)


def _view2() -> ViewConfig:
    return ViewConfig(blur_prob=0.1, solarize_prob=0.2)


@dataclass
class AugmentConfig:
    """The two view distributions T (view1) and T' (view2), run batched on the device."""

    preset: Literal["auto", "none", "32", "64", "96", "224"] = _f(
        "auto", help="defaults by resolution; auto picks from image_size; keys you set win")
    image_size: int = _f(32, min=8, max=1024, help="side of the augmented views")
    interpolation: Literal["bicubic", "bilinear"] = _f("bicubic")
    mean: Optional[tuple[float, float, float]] = _f(None, help="defaults to the dataset's")
    std: Optional[tuple[float, float, float]] = _f(None, help="defaults to the dataset's")
    view1: ViewConfig = _sub(ViewConfig)
    view2: ViewConfig = field(default_factory=_view2, metadata={"help": "T'"})


# Resolution presets, applied under the user's keys. At 32 px the paper's blur rule gives a 3x3
# kernel; solo-learn and lightly's CIFAR recipes switch blur off (byol.md A.5, A.9).
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "32": {"view1": {"blur_prob": 0.0}, "view2": {"blur_prob": 0.0}},
    "64": {},
    "96": {},
    "224": {},
}


@dataclass
class ModelConfig:
    """Online network: timm backbone + projector + predictor (BYOL §3.3)."""

    backbone: str = _f("resnet18", help="any timm model name")
    backbone_kwargs: dict[str, Any] = _f({}, help="extra timm.create_model kwargs")
    cifar_stem: bool = _f(False, help="ResNet: 3x3 stride-1 first conv, no max-pool")
    pretrained: bool = _f(False, help="start from timm's pretrained weights (downloads)")
    proj_hidden_dim: int = _f(4096, min=1)
    proj_dim: int = _f(256, min=1)
    pred_hidden_dim: int = _f(4096, min=1)
    target_init: Literal["independent", "copy"] = _f(
        "independent", help="independent RNG init as the reference code, or a copy of online")
    weight_norm: bool = _f(False, help="weight normalization (Salimans & Kingma 2016) on every "
                                       "conv/linear layer of encoder, projector and predictor")
    weight_norm_init: Literal["data", "none"] = _f(
        "data", help="weight_norm: the paper's data-dependent init from one batch, or none")
    mean_only_bn: bool = _f(False, help="BatchNorm -> mean-only BN (Salimans & Kingma §2.2)")


@dataclass
class ByolConfig:
    """Target network EMA (BYOL §3.1, eq. for tau_k)."""

    tau_base: float = _f(0.996, min=0.0, max=1.0)


@dataclass
class OptimConfig:
    """Optimizer by timm registry name; BYOL: LARS, lr = base_lr * B / 256 (App. J)."""

    name: str = _f("lars", help="timm registry name or ours (ssl-suite optimizers lists them)")
    base_lr: float = _f(0.2, min_exclusive=0.0)
    lr_scaling: Literal["linear", "sqrt", "none"] = _f(
        "linear", help="lr = base_lr * B/256 (linear, SGD-like), * sqrt(B/256) (adaptive), or none")
    weight_decay: float = _f(1.5e-6, min=0.0)
    normalized_weight_decay: Optional[float] = _f(
        None, min=0.0, help="Loshchilov & Hutter: weight_decay = this * sqrt(b / (B * T))")
    momentum: float = _f(0.9, min=0.0, max=1.0)
    trust_coeff: float = _f(1e-3, min_exclusive=0.0, help="LARS eta")
    exclude_bias_and_norm: bool = _f(True, help="no wd and no LARS adaptation for biases/norms")
    predictor_lr_mult: float = _f(1.0, min_exclusive=0.0)
    lookahead_k: int = _f(5, min=1, help="lookahead_<name>: sync every k steps (Zhang et al.)")
    lookahead_alpha: float = _f(0.5, min_exclusive=0.0, max=1.0, help="lookahead: slow step size")
    lookahead_pullback: Literal["none", "reset", "pullback"] = _f(
        "none", help="lookahead: what happens to the base optimizer's momentum at a sync")
    kwargs: dict[str, Any] = _f({}, help="extra optimizer constructor kwargs")
    wrs: bool = _f(False, help="weight rescaling after every step: the conv/linear weights that "
                               "a normalisation layer follows back to target norm (WRS)")
    wrs_per: Literal["unit", "tensor"] = _f("unit", help="wrs: per output unit or per tensor")
    wrs_target_norm: float = _f(1.0, min_exclusive=0.0)


@dataclass
class ScheduleConfig:
    """Per-step learning-rate schedule after a linear warmup from 0: cosine to final_lr_frac
    (BYOL), step decay, or cosine with warm restarts (SGDR, Loshchilov & Hutter 2017); or
    ``lanczos``: LR and momentum learned on the fly from a Lanczos estimate of the Hessian
    (Granziol et al. 2022), the base LR until the end of the warmup."""

    name: Literal["cosine", "step", "restarts", "lanczos"] = _f("cosine")
    warmup_epochs: float = _f(10.0, min=0.0)
    final_lr_frac: float = _f(0.0, min=0.0, max=1.0)
    milestones: list[float] = _f([], help="step: epochs at which the LR is multiplied by gamma")
    gamma: float = _f(0.1, min_exclusive=0.0, max=1.0)
    restart_epochs: float = _f(10.0, min_exclusive=0.0, help="restarts: first cycle length T_0")
    restart_mult: float = _f(2.0, min=1.0, help="restarts: cycle length factor T_mult")
    lanczos_every_epochs: float = _f(20.0, min_exclusive=0.0,
                                     help="lanczos: epochs between estimates (the code's 20)")
    lanczos_steps: int = _f(20, min=2, help="lanczos: Lanczos iterations per estimate")
    lanczos_images: int = _f(256, min=2, help="lanczos: images of the fixed curvature batch")
    lanczos_variant: Literal["heavy_ball", "gd", "ssgdmn"] = _f(
        "heavy_ball", help="lanczos: heavy_ball (Polyak lr and momentum), gd, ssgdmn")
    lanczos_lr_scale: float = _f(1.0, min_exclusive=0.0, help="lanczos: factor on the learned lr")


@dataclass
class TrainConfig:
    """Loop, precision, checkpoints."""

    epochs: int = _f(100, min=1)
    max_steps: Optional[int] = _f(None, min=1, help="stop after this many optimizer steps")
    batch_size: int = _f(256, min=1, help="global batch per optimizer step, all processes")
    grad_accum_steps: int = _f(1, min=1)
    precision: Literal["no", "bf16", "fp16", "auto"] = _f(
        "no", help="auto: bf16 where the device computes it natively (CUDA with bf16; a CPU "
                   "with AMX or AVX512-BF16), else no")
    sync_bn: bool = _f(True, help="SyncBatchNorm when more than one process")
    grad_checkpointing: bool = _f(False, help="timm set_grad_checkpointing on the backbone")
    channels_last: bool = _f(False)
    ddp_comm_hook: Literal["none", "fp16", "bf16", "power_sgd", "batched_power_sgd"] = _f(
        "none", help="DDP gradient compression through Accelerate (torch's comm hooks)")
    log_every: int = _f(10, min=1, help="steps between metric lines (and finiteness checks)")
    checkpoint_every: int = _f(500, min=1, help="optimizer steps between checkpoints")
    keep_checkpoints: int = _f(2, min=1)
    knn_every: int = _f(10, min=-1, help="epochs between kNN monitors; 0: only at start and "
                                          "end; -1: never")
    knn_k: int = _f(200, min=1)
    knn_temperature: float = _f(0.1, min_exclusive=0.0)
    eval_batch_size: int = _f(256, min=1)
    progress: bool = _f(True, help="tqdm progress bar")
    trackers: list[str] = _f([], help="accelerate trackers, e.g. [tensorboard]")
    log_elr: bool = _f(False, help="log the effective LR lr/|w|^2 and the angular update of the "
                                   "scale-invariant weights on every log step (any optimizer)")
    bn_recompute_batches: int = _f(
        20, min=0, help="optimizers whose final model is an average (replicasgd): batches over "
                        "which its BatchNorm statistics are recomputed at the end")


@dataclass
class GradInitConfig:
    """GradInit (Zhu et al., NeurIPS 2021): one learned multiplier per parameter tensor so that
    one step of the simulated optimizer gives the lowest loss on a second batch, under the
    gradient-norm constraint ||g||_{p_A} <= gamma and the lower bound min_scale (Eq. 1, Alg. 1);
    run once before training, the multipliers folded into the weights."""

    enabled: bool = _f(False, help="run GradInit before the first step (not on --resume)")
    steps: int = _f(390, min=1, help="T: GradInit iterations (the paper's CIFAR runs: 390, one "
                                     "epoch at batch 128); each draws two batches")
    batch_size: Optional[int] = _f(None, min=2, help="images per GradInit batch; null: the "
                                                     "run's micro-batch (the paper: 128)")
    optimizer: Literal["auto", "sgd", "adam"] = _f(
        "auto", help="the optimizer A whose first step is simulated; auto: adam for Adam-family "
                     "run optimizers, else sgd")
    lr: Optional[float] = _f(None, min_exclusive=0.0,
                             help="eta of the simulated step; null: the run's scaled LR")
    gamma: float = _f(1.0, min_exclusive=0.0, help="bound on the gradient norm (paper: 1)")
    min_scale: float = _f(0.01, min=0.0, help="alpha: lower bound on weight multipliers")
    scale_lr: float = _f(1e-2, min_exclusive=0.0, help="tau: Adam LR on the multipliers")
    grad_clip: Optional[float] = _f(1.0, min_exclusive=0.0,
                                    help="clip each multiplier gradient to [-c, c] (code: 1)")
    normalize_grad: bool = _f(False, help="the CIFAR scripts' A[g] = g/||g|| (code option)")
    second_order: bool = _f(True, help="differentiate through g (paper); false: the code's "
                                       "detached step")


@dataclass
class InitConfig:
    """Initialization phases that run before training."""

    gradinit: GradInitConfig = _sub(GradInitConfig)


@dataclass
class GrowthConfig:
    """GradMax (Evci et al., ICLR 2022): grow the hidden width of layer pairs during training
    without changing the network's function (new incoming weights zero, new outgoing weights the
    top-k left singular vectors of the gradient matrix, Eq. 8-9)."""

    enabled: bool = _f(False, help="grow the listed pairs on the schedule below")
    method: Literal["gradmax", "random"] = _f(
        "gradmax", help="new outgoing weights: gradmax (SVD) or random (the paper's baseline)")
    pairs: list[str] = _f(["blocks"], help="'blocks': conv1 -> bn1 -> conv2 of every residual "
                                           "block of the encoder; 'projector' / 'predictor': "
                                           "their hidden layer; or 'in,out' / 'in,norm,out' "
                                           "module names (e.g. encoder.layer1.0.conv1,...)")
    start_fraction: float = _f(0.25, min_exclusive=0.0, max=1.0,
                               help="pretraining starts each pair at this fraction of its width "
                                    "and grows it back to full width (the paper: 0.25)")
    n_growths: int = _f(12, min=1, help="growth events, equal steps to full width (paper: 12)")
    start_epoch: float = _f(1.0, min=0.0, help="first growth (after this many epochs)")
    every_epochs: float = _f(1.0, min_exclusive=0.0, help="epochs between growth events")
    scale: float = _f(0.5, min_exclusive=0.0, help="new outgoing vector norm (paper code: 0.5)")
    scale_method: Literal["mean_norm", "fixed"] = _f(
        "mean_norm", help="mean_norm: scale x mean norm of the existing outgoing vectors")
    relu1: bool = _f(True, help="ReLU -> ReLU1 (derivative 1 at 0, same function) so the new "
                                "zero-incoming units get a gradient (the code's relu1)")
    batch_size: Optional[int] = _f(None, min=1, help="images of the growth batch (paper: 128); "
                                                      "null: the run's micro-batch")
    exp_avg_sq_fill: Literal["mean", "zero"] = _f(
        "mean", help="Adam-type second moments of new entries: mean of the old (default) or "
                     "zero (the paper code)")


@dataclass
class SparsityConfig:
    """SCL (Tang et al., TNNLS 2023; the regulariser and normalisation are a reconstruction):
    weights w = w_hat * step(m_hat) with trainable mask variables, the identity STE, per-feature
    normalised mask gradients and the connection-count regulariser lambda * R."""

    enabled: bool = _f(False, help="mask every conv/linear weight of the chosen modules")
    modules: list[str] = _f(["encoder"], help="which parts are masked (encoder, projector, "
                                              "predictor; finetune: encoder, head)")
    layers: list[str] = _f(["conv", "linear"], help="layer kinds to mask")
    exclude: list[str] = _f([], help="module names / fnmatch patterns kept dense (e.g. "
                                     "encoder.conv1)")
    weight: float = _f(0.1, min=0.0, help="lambda of the connection-count regulariser: the "
                                          "pull on every mask variable, against a task "
                                          "gradient normalised to RMS 1 per feature")
    normalize: bool = _f(False, help="R / N_total (lambda then needs to be about N_total "
                                     "times larger)")
    init: float = _f(1.0, min_exclusive=0.0, help="initial mask variable (> 0: dense start)")
    norm: Literal["rms", "l2", "maxabs", "none"] = _f(
        "rms", help="per-feature normalisation of the mask gradient")
    mask_lr: float = _f(0.01, min_exclusive=0.0, help="LR of the mask variables (own group, no "
                                                       "weight decay, follows the schedule)")


@dataclass
class Config:
    """A whole experiment."""

    run_dir: str = _f("runs/byol", help="where checkpoints and metrics.jsonl go")
    seed: int = _f(0, min=0)
    data: DataConfig = _sub(DataConfig)
    augment: AugmentConfig = _sub(AugmentConfig)
    model: ModelConfig = _sub(ModelConfig)
    byol: ByolConfig = _sub(ByolConfig)
    optim: OptimConfig = _sub(OptimConfig)
    schedule: ScheduleConfig = _sub(ScheduleConfig)
    train: TrainConfig = _sub(TrainConfig)
    init: InitConfig = _sub(InitConfig)
    growth: GrowthConfig = _sub(GrowthConfig)
    sparsity: SparsityConfig = _sub(SparsityConfig)


@dataclass
class LinearEvalConfig:
    """Linear evaluation (BYOL App. C.1): frozen encoder and BN, a linear classifier on pooled
    features, SGD with Nesterov momentum, no weight decay, cosine LR; LR swept on a held-out part
    of the training split, the best one retrained on the whole split and reported on test."""

    mode: Literal["cached", "augmented"] = _f(
        "cached", help="cached: features extracted once (seconds); augmented: crop+flip per epoch")
    lrs: list[float] = _f([0.4, 0.3, 0.2, 0.1, 0.05], help="LR sweep (absolute, as the paper)")
    epochs: int = _f(80, min=1)
    batch_size: int = _f(1024, min=1)
    momentum: float = _f(0.9, min=0.0, max=1.0)
    nesterov: bool = _f(True)
    weight_decay: float = _f(0.0, min=0.0)
    val_fraction: float = _f(0.1, min_exclusive=0.0, max=0.5,
                             help="class-balanced part of the training split used to pick the LR")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), min=0.0, max=1.0,
                                         help="augmented mode: random resized crop area")
    optimizer: str = _f("sgd", help="sgd: the paper's SGD (Nesterov); or any name of "
                                    "`ssl-suite optimizers` (nsgd, koalam, mbf, svi, ...)")
    optimizer_kwargs: dict[str, Any] = _f({}, help="extra constructor kwargs of optimizer")


@dataclass
class FinetuneConfig:
    """Semi-supervised fine-tuning (BYOL App. C.1): the whole network trained on a labelled
    fraction of the training split; SGD Nesterov 0.9, no weight decay; top-1 and top-5."""

    lrs: list[float] = _f([0.005, 0.01, 0.02, 0.05, 0.1], help="LR sweep (absolute)")
    epochs: int = _f(30, min=1)
    batch_size: int = _f(1024, min=1, help="global batch (capped at the labelled subset size)")
    momentum: float = _f(0.9, min=0.0, max=1.0)
    nesterov: bool = _f(True)
    weight_decay: float = _f(0.0, min=0.0)
    val_fraction: float = _f(0.1, min_exclusive=0.0, max=0.5,
                             help="class-balanced part of the training split used to pick the LR")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), min=0.0, max=1.0)
    optimizer: str = _f("sgd", help="sgd: the paper's SGD (Nesterov); or any name of "
                                    "`ssl-suite optimizers` (nsgd, koalam, mbf, svi, ...)")
    optimizer_kwargs: dict[str, Any] = _f({}, help="extra constructor kwargs of optimizer")
    init: InitConfig = _sub(InitConfig)
    growth: GrowthConfig = _sub(GrowthConfig)
    sparsity: SparsityConfig = _sub(SparsityConfig)


@dataclass
class KnnJobConfig:
    """Weighted kNN (Wu et al. 2018) on the labelled train split, reported on test."""

    k: int = _f(200, min=1)
    temperature: float = _f(0.1, min_exclusive=0.0)


@dataclass
class EvalConfig:
    """Evaluation jobs on a pretraining run. ``data`` starts from the run's own data section."""

    seed: int = _f(0, min=0)
    data: DataConfig = _sub(DataConfig)
    precision: Literal["no", "bf16", "fp16", "auto"] = _f(
        "no", help="auto: bf16 where the device computes it natively (CUDA with bf16; a CPU "
                   "with AMX or AVX512-BF16), else no")
    eval_batch_size: int = _f(256, min=1)
    progress: bool = _f(True)
    linear: LinearEvalConfig = _sub(LinearEvalConfig)
    finetune: FinetuneConfig = _sub(FinetuneConfig)
    knn: KnnJobConfig = _sub(KnnJobConfig)


# --------------------------------------------------------------------------------------------
# Conversion and validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        # allow numbers for string literals such as preset: 32
        if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in args:
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - programming error


def _check_range(value: Any, meta: dict, key: str) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if "min" in meta and v < meta["min"]:
            raise ConfigError(f"{key}: {value!r} is below the minimum {meta['min']}")
        if "max" in meta and v > meta["max"]:
            raise ConfigError(f"{key}: {value!r} is above the maximum {meta['max']}")
        if "min_exclusive" in meta and v <= meta["min_exclusive"]:
            raise ConfigError(f"{key}: {value!r} must be greater than {meta['min_exclusive']}")
        if "max_exclusive" in meta and v >= meta["max_exclusive"]:
            raise ConfigError(f"{key}: {value!r} must be less than {meta['max_exclusive']}")
    if isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(v, (int, float)) for v in value) and value[0] > value[1]:
        raise ConfigError(f"{key}: range {list(value)} has its low end above its high end")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            allowed = ", ".join(sorted(names))
            raise ConfigError(f"{key}: unknown key (allowed here: {allowed})")
        f = names[k]
        if (dataclasses.is_dataclass(hints[k]) and isinstance(v, dict)
                and f.default_factory is not dataclasses.MISSING):
            # a partial section starts from the field's own default (view2 is not view1)
            v = _deep_merge(_shallow_dict(f.default_factory()), v)
        value = _convert(v, hints[k], key)
        _check_range(value, dict(names[k].metadata), key)
        kwargs[k] = value
    obj = cls(**kwargs)
    return obj


def _shallow_dict(obj: Any) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _apply_presets(raw: dict) -> dict:
    aug = raw.get("augment")
    aug = dict(aug) if isinstance(aug, dict) else ({} if aug is None else aug)
    if not isinstance(aug, dict):
        return raw
    preset = str(aug.get("preset", "auto"))
    if preset == "auto":
        size = aug.get("image_size", AugmentConfig.image_size)
        if isinstance(size, int) and not isinstance(size, bool):
            preset = "32" if size <= 32 else "64" if size <= 64 else "96" if size <= 128 else "224"
    if preset in AUGMENT_PRESETS:
        aug = _deep_merge(AUGMENT_PRESETS[preset], aug)
    out = dict(raw)
    out["augment"] = aug
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"{text}: overrides are written key=value, e.g. train.epochs=10")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"{text}: empty key in override")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def _set_dotted(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = {}
            node[p] = nxt
        elif not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""
    def conv(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(cfg)


def build_config(raw: Optional[dict] = None, overrides: Optional[list[str]] = None,
                 cls: type = Config) -> Any:
    """Validated config from a raw mapping plus ``key=value`` overrides."""
    raw = dict(raw or {})
    for ov in overrides or []:
        parts, value = parse_override(ov)
        _set_dotted(raw, parts, value)
    if cls is Config:
        raw = _apply_presets(raw)
    cfg = _build(cls, raw)
    validate(cfg)
    return cfg


def read_yaml(path: Union[str, Path]) -> dict:
    """The mapping in a YAML config file; ConfigError (one line) if missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config: {p}{where} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {p} must hold a mapping of sections")
    return raw


def load_config(path: Union[str, Path, None], overrides: Optional[list[str]] = None,
                cls: type = Config) -> Any:
    """Read a YAML file (or nothing) and apply dotted overrides; raise ConfigError on problems."""
    raw = read_yaml(path) if path is not None else {}
    return build_config(raw, overrides, cls)


def validate(cfg: Any) -> None:
    """Cross-field checks that a single field's type and range cannot express."""
    if isinstance(cfg, (Config, EvalConfig)):
        if cfg.data.name in ("cifar10", "cifar100", "stl10", "imagefolder") and not cfg.data.root:
            raise ConfigError(f"data.root: required for data.name={cfg.data.name!r}")
    if isinstance(cfg, EvalConfig):
        for key in ("linear", "finetune"):
            if not getattr(cfg, key).lrs:
                raise ConfigError(f"{key}.lrs: give at least one learning rate")
    if isinstance(cfg, Config):
        if cfg.train.batch_size % cfg.train.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size: {cfg.train.batch_size} is not divisible by "
                f"train.grad_accum_steps={cfg.train.grad_accum_steps}")


def save_yaml(cfg: Any, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
