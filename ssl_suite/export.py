"""Export a run's encoder as a plain timm backbone: safetensors weights plus a JSON sidecar.

``ssl-suite export --run RUN --out encoder.safetensors`` (or :func:`export_encoder`) writes two
files:

``encoder.safetensors``
    The encoder's tensors (parameters and batch-norm buffers) from the run's latest checkpoint,
    keyed exactly like ``timm.create_model(timm_name, num_classes=0, **timm_kwargs).state_dict()``
    (no ``fc.*`` keys: the classifier of a ``num_classes=0`` model is an ``nn.Identity``). The
    safetensors header carries string metadata: ``format`` (``"pt"``), ``ssl_suite_format``,
    ``format_version``, ``timm_name``, ``timm_kwargs`` (JSON), ``cifar_stem``, ``num_features``,
    ``network``, ``step`` and ``ssl_suite_version``, so the file alone is enough to rebuild the
    model.
``encoder.json`` (the weights path with suffix ``.json``)
    The sidecar: ``timm_name`` (``resnet18``, or ``resnet18_cifar`` for the CIFAR stem, see
    :mod:`ssl_suite.models.timm_models`), ``timm_kwargs`` (the run's ``model.backbone_kwargs``),
    ``cifar_stem``, ``num_features``, ``backbone``, ``network``, ``source`` (run directory,
    checkpoint directory, step), ``input`` (image size and, where known, normalisation mean/std;
    ``null`` means the dataset statistics computed at run time), ``config`` (the whole run
    config), ``git_commit`` / ``git_dirty`` of the ssl_suite source (``null`` when it is not a
    git checkout), ``ssl_suite_version``, ``timm_version``, ``torch_version``, ``sha256`` of the
    weights file and ``created`` (UTC).

Loading in timm (``import ssl_suite`` first when ``timm_name`` ends in ``_cifar``: importing it
registers those names)::

    import json, timm
    import ssl_suite  # registers resnet18_cifar ... resnet152_cifar

    meta = json.load(open("encoder.json"))
    model = timm.create_model(
        meta["timm_name"], num_classes=0, **meta["timm_kwargs"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file="encoder.safetensors", num_classes=0),
    ).eval()
    features = model(images)  # (N, meta["num_features"])

    # or, in one call (strict load, eval mode):
    model = ssl_suite.load_backbone("encoder.safetensors")

What timm does with the file (timm 1.0, ``timm.models._builder.load_pretrained``):

* The loader is chosen by the file name: a path ending in ``.safetensors`` is read with
  ``safetensors.torch.load_file``; any other name goes to ``torch.load(weights_only=True)``, which
  cannot read a safetensors file. That is why ``out`` must end in ``.safetensors``.
* ``file`` in the overlay takes priority over the config's URL / hub id, so nothing is downloaded.
* If the model's ``num_classes`` differs from the pretrained config's (1000 for timm's
  ``resnet18``, 10 for ``resnet18_cifar``), timm drops ``fc.weight``/``fc.bias`` from the file
  (absent here, so nothing happens) and loads with ``strict=False``: missing keys would then only
  be logged (INFO), unexpected ones logged as a warning. The exported file holds exactly the
  ``num_classes=0`` model's keys, so that load is complete even with just
  ``pretrained_cfg_overlay=dict(file=...)``. Adding ``num_classes=0`` to the overlay makes the
  config match the model, and timm then loads with ``strict=True`` and raises on any mismatch;
  this is optional but recommended.
* For fine-tuning, ``num_classes=N`` gives a model whose ``fc`` keeps its random init (timm logs
  it as a missing key, which is expected).

Weights are only ever read through safetensors (no unpickling); :func:`load_backbone` refuses
any other file with a one-line :class:`~ssl_suite.errors.CheckpointError`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

import safetensors
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models import split_model_name_tag
from torch import nn

from . import __version__
from .engine.checkpoint import load_module_state
from .errors import CheckpointError, SSLSuiteError
from .models import timm_models as _timm_models  # noqa: F401 - registers the *_cifar names

__all__ = ["ExportError", "FORMAT", "FORMAT_VERSION", "export_encoder", "load_backbone",
           "main_export", "sidecar_path", "timm_name_for"]

FORMAT = "ssl_suite.encoder"
FORMAT_VERSION = 1


class ExportError(SSLSuiteError):
    """An encoder that cannot be exported; one line naming the setting or file."""


def sidecar_path(weights: str | Path) -> Path:
    """The JSON sidecar next to a weights file: ``encoder.safetensors`` -> ``encoder.json``."""
    return Path(weights).with_suffix(".json")


def timm_name_for(backbone: str, cifar_stem: bool) -> str:
    """The timm model name that builds ``create_backbone(backbone, cifar_stem)``.

    A pretrained tag (``resnet18.a1_in1k``) is dropped: only the architecture matters here.
    """
    arch, _tag = split_model_name_tag(backbone)
    if not cifar_stem:
        return arch
    name = f"{arch}_cifar"
    if not timm.is_model(name):
        have = ", ".join(_timm_models.CIFAR_RESNETS)
        raise ExportError(f"model.backbone: {arch} with cifar_stem=true has no timm model name "
                          f"to export to (CIFAR-stem names exist for {have})")
    return name


def _git(args: list[str], cwd: Path) -> Optional[str]:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _git_info() -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the git checkout holding this package's source, or (None, None).

    The package file must be tracked by that repository, so an install inside some other
    repository (a site-packages in a project's checkout) does not report that project's commit.
    """
    pkg = Path(__file__).resolve().parent
    commit = _git(["rev-parse", "--verify", "HEAD"], pkg)
    if not commit or _git(["ls-files", "--error-unmatch", "__init__.py"], pkg) is None:
        return None, None
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", "."], pkg)
    return commit, (bool(status) if status is not None else None)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _step_of(ckpt_dir: Path) -> Optional[int]:
    try:
        return int(ckpt_dir.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return None


def _normalisation(cfg) -> tuple[Optional[list], Optional[list]]:
    """Mean/std the run normalised with, where the config or a dataset constant says."""
    mean, std = cfg.augment.mean, cfg.augment.std
    if mean is None or std is None:
        from .data.datasets import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
        known = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
        dm, ds = known.get(cfg.data.name, (None, None))
        mean, std = mean if mean is not None else dm, std if std is not None else ds
    return (list(mean) if mean is not None else None, list(std) if std is not None else None)


def _build(timm_name: str, kwargs: dict[str, Any], what: str, err: type[Exception]) -> nn.Module:
    try:
        return timm.create_model(timm_name, num_classes=0, **kwargs)
    except Exception as e:  # noqa: BLE001 - unknown name, bad kwargs: one line for the user
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise err(f"{what}: cannot build timm model {timm_name!r} with {kwargs}: {first}") from None


def _global_sparsity(tensors: dict[str, torch.Tensor], layers: dict[str, float]) -> float:
    """Fraction of zero weights over the SCL-masked layers of the exported encoder."""
    weights = [tensors[f"{n}.weight"] for n in layers if f"{n}.weight" in tensors]
    total = sum(w.numel() for w in weights)
    return float(sum((w == 0).sum().item() for w in weights) / max(total, 1))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_encoder(run_dir: str | Path, out: str | Path, network: str = "online") -> Path:
    """Write the run's encoder to ``out`` (safetensors) and its sidecar ``out.with_suffix('.json')``.

    The weights come from the run's latest checkpoint (``network``: ``'online'`` or
    ``'target'``). Before writing, they are loaded strictly into
    ``timm.create_model(timm_name, num_classes=0, **backbone_kwargs)``, so a file that timm could
    not load is never written. Both files are written atomically (temporary name, then rename).
    Returns the weights path. Raises :class:`ExportError` / :class:`CheckpointError` with one line.
    """
    from .config import to_dict
    from .engine.runs import encoder_state, run_config

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out: {out} must end in .safetensors (timm chooses its loader by "
                          "the file name and reads anything else with torch.load)")
    if network not in ("online", "target"):
        raise ExportError(f"--network: must be 'online' or 'target', got {network!r}")
    cfg = run_config(run_dir)
    mc = cfg.model
    timm_name = timm_name_for(mc.backbone, mc.cifar_stem)
    kwargs = dict(mc.backbone_kwargs)
    state, ckpt_dir = encoder_state(run_dir, network)
    sparsity = None
    if mc.weight_norm or mc.mean_only_bn or cfg.sparsity.enabled or cfg.growth.enabled:
        # folded into plain conv/linear/BatchNorm layers (SCL: the masked dense weights)
        from .engine.runs import load_encoder
        encoder = load_encoder(run_dir, network=network)[0]
        state = encoder.state_dict()
        sparsity = getattr(encoder, "scl_sparsity", None)

    model = _build(timm_name, kwargs, "export", ExportError)
    expected = model.state_dict()
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if wrong:
        why = (" (a GradMax run exports once its last growth has happened)"
               if cfg.growth.enabled else "")
        raise ExportError(f"export: {wrong[0]} has shape {tuple(state[wrong[0]].shape)} in "
                          f"{ckpt_dir}, timm's {timm_name} has {tuple(expected[wrong[0]].shape)}"
                          f"{why}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ExportError(
            f"export: the {network} encoder of {ckpt_dir} does not match timm's {timm_name} "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
            f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in expected}
    load_module_state(model, tensors, f"{ckpt_dir}/{network}.safetensors (encoder as {timm_name})")
    num_features = getattr(model, "num_features", None)
    num_features = int(num_features) if num_features is not None else None
    step = _step_of(ckpt_dir)

    metadata = {
        "format": "pt",
        "ssl_suite_format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "timm_name": timm_name,
        "timm_kwargs": json.dumps(kwargs, sort_keys=True),
        "cifar_stem": json.dumps(bool(mc.cifar_stem)),
        "num_features": str(num_features),
        "network": network,
        "step": str(step),
        "ssl_suite_version": __version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, lambda p: save_file(tensors, str(p), metadata=metadata))

    commit, dirty = _git_info()
    mean, std = _normalisation(cfg)
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": out.name,
        "sha256": _sha256(out),
        "timm_name": timm_name,
        "timm_kwargs": kwargs,
        "cifar_stem": bool(mc.cifar_stem),
        "num_features": num_features,
        "backbone": mc.backbone,
        "network": network,
        "source": {
            "run_dir": str(Path(run_dir).resolve()),
            "checkpoint": str(Path(ckpt_dir).resolve()),
            "step": step,
        },
        "input": {"image_size": cfg.augment.image_size, "mean": mean, "std": std},
        "sparsity": None if sparsity is None else {
            "global": _global_sparsity(tensors, sparsity), "layers": sparsity},
        "config": to_dict(cfg),
        "git_commit": commit,
        "git_dirty": dirty,
        "ssl_suite_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(sidecar, indent=2, default=str) + "\n"
    _atomic_write(sidecar_path(out), lambda p: p.write_text(text))
    return out


def _header(path: Path) -> dict[str, str]:
    """The safetensors header metadata; refuses anything that is not a safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any failure: not (valid) safetensors
        raise CheckpointError(
            f"{path} is not a safetensors file ({type(e).__name__}); refusing to load it "
            "(weights are only read from safetensors, never unpickled)") from None


def _read_sidecar(path: Path) -> Optional[dict[str, Any]]:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"sidecar {side} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"sidecar {side} does not hold a JSON object")
    return data


def load_backbone(path: str | Path) -> nn.Module:
    """The exported encoder at ``path`` as a timm model (``num_classes=0``), in eval mode.

    The model is built from the sidecar's ``timm_name`` and ``timm_kwargs`` (or, without a
    sidecar, from the same fields in the safetensors header) and the weights are loaded with
    ``strict=True``. Only safetensors files are read; anything else (a pickle, a ``torch.save``
    file) is refused with :class:`~ssl_suite.errors.CheckpointError` before a byte is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    header = _header(path)
    side = _read_sidecar(path)
    if side is not None:
        timm_name, kwargs = side.get("timm_name"), side.get("timm_kwargs", {})
        if header.get("timm_name") not in (None, timm_name):
            raise CheckpointError(
                f"sidecar {sidecar_path(path)} describes {timm_name!r} but {path} was exported "
                f"as {header['timm_name']!r}; remove or fix the sidecar")
    else:
        timm_name = header.get("timm_name")
        try:
            kwargs = json.loads(header.get("timm_kwargs", "{}"))
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: header field timm_kwargs is not valid JSON") from None
    if not isinstance(timm_name, str) or not timm_name:
        raise CheckpointError(f"{path}: no sidecar {sidecar_path(path).name} and no timm_name in "
                              "its safetensors header; cannot tell which model it holds")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: timm_kwargs must be a mapping, got {kwargs!r}")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - truncated or corrupt tensor data
        raise CheckpointError(f"{path} is corrupt or unreadable ({type(e).__name__})") from None
    model = _build(timm_name, kwargs, str(path), CheckpointError)
    load_module_state(model, state, f"{path} ({timm_name})")
    return model.eval()


def main_export(run: str, out: str, network: str = "online") -> int:
    """``ssl-suite export --run RUN --out FILE [--network online|target]``: print both paths."""
    weights = export_encoder(run, out, network)
    print(f"encoder weights: {weights}")
    print(f"sidecar: {sidecar_path(weights)}")
    return 0
