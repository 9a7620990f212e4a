"""Checkpoints: safetensors weights with the resolved run config in their metadata, and a
sibling ``*.state.pt`` with the optimizer state (torch.save, loaded with weights_only=True).

The weights file alone is enough to rebuild and run the model (``imkd eval --checkpoint``,
export); the state file is only for resuming. Both are written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from imkd_deploy.atomic import atomic_path
from imkd_deploy.config import ConfigError, RunConfig
from imkd_deploy.errors import UserError

FORMAT = "imkd-checkpoint-1"


@dataclass
class Checkpoint:
    path: Path
    role: str
    step: int
    run_config: RunConfig
    model: dict[str, torch.Tensor]      # network weights (what export and eval need)
    extra: dict[str, torch.Tensor]      # training-only modules (distillation adapters)


def _atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def state_path(path: Path) -> Path:
    return Path(path).with_suffix(".state.pt")


def save_checkpoint(path: Path, *, role: str, step: int, run_config: RunConfig, model: torch.nn.Module,
                    extra: torch.nn.Module | None = None, train_state: dict | None = None) -> Path:
    """Write ``path`` (.safetensors) and, when ``train_state`` is given, ``path.state.pt``."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if extra is not None:
        tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra.state_dict().items()})
    meta = {"format": FORMAT, "role": role, "step": str(step), "run_config": run_config.to_json()}
    if train_state is not None:
        # the state records its own step; resume refuses a state/weights pair that disagree
        # (a crash between the two writes)
        train_state = {**train_state, "step": step}
        _atomic(state_path(path), lambda tmp: torch.save(train_state, tmp))
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} was not written by imkd train (metadata format {meta.get('format')!r})")
    try:
        run_config = RunConfig.from_json(meta["run_config"])
    except (ConfigError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {path}: its stored run config is invalid: {exc}") from None
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return Checkpoint(path, meta["role"], int(meta["step"]), run_config, model, extra)


def load_train_state(path: Path) -> dict:
    sp = state_path(path)
    if not sp.is_file():
        raise UserError(f"cannot resume from {path}: its training state {sp.name} is missing")
    return torch.load(sp, map_location="cpu", weights_only=True)


def default_device() -> str:
    """Where a checkpoint's model decodes by default (`imkd eval`, `imkd infer`): CUDA when a GPU
    is visible, else the CPU. FP32 parity references pass "cpu" explicitly (CUDA runs TF32)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: Path, device: str | torch.device = "cpu"):
    """Rebuild the network stored in a checkpoint, weights loaded, in eval mode."""
    from imkd_deploy.model.build import build_model

    ckpt = load_checkpoint(path)
    rc = ckpt.run_config
    model = build_model(ckpt.role, rc.model, rc.distill)
    missing, unexpected = model.load_state_dict(ckpt.model, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not fit a {ckpt.role} built from its own config: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval(), ckpt
