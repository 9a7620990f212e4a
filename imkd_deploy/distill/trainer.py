"""The training loop for the LiDAR teacher and the IMKD student, single process or torchrun DDP.

Read top to bottom: set up (distributed, seeds, data, model, optimizer, resume), then one loop
of steps. The data order is a pure function of (seed, epoch), and the LR of the step, so a
run resumed from a checkpoint continues exactly where it stopped.

    torchrun --nproc-per-node 8 -m imkd_deploy.cli train student ...   # unchanged for DDP
    train(run_cfg, dataroot, out_dir, teacher_ckpt=None, role="student")  # from Python
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from imkd_deploy.atomic import atomic_write_json
from imkd_deploy.config import ModelConfig, RunConfig
from imkd_deploy.distill.checkpoint import load_checkpoint, load_model, load_train_state, save_checkpoint
from imkd_deploy.distill.dataset import FrameDataset, collate, move_targets, student_args, teacher_args
from imkd_deploy.distill.losses import IMKDCriterion
from imkd_deploy.errors import UserError
from imkd_deploy.export.metadata import file_sha256
from imkd_deploy.model.build import build_model

log = logging.getLogger(__name__)

LAST = "last.safetensors"


# --------------------------------------------------------------------------- pieces
class TrainStep(nn.Module):
    """Network + criterion as ONE module, so DDP synchronises the adapters' gradients too."""

    def __init__(self, role: str, net: nn.Module, criterion: IMKDCriterion):
        super().__init__()
        self.role, self.net, self.criterion = role, net, criterion

    def forward(self, batch: dict, teacher_out: dict | None) -> dict[str, torch.Tensor]:
        device = batch["heatmap"].device
        if self.role == "student":
            out = self.net.forward_train(*student_args(batch, device))
        else:
            out = self.net.forward_train(*teacher_args(batch, device))
        return self.criterion(out, batch, teacher_out)


def lr_factor(step: int, cfg) -> float:
    """Linear warm-up, then cosine to 0 or a x0.1 step at 2/3 and 8/9 of the run."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 0.1 ** sum(progress >= m for m in (2 / 3, 8 / 9))


def kd_factor(step: int, max_steps: int, kd_until: float | None) -> float:
    """Scale of the distillation weights: 1 throughout, or a cosine from 1 to 0 at kd_until of the run.

    The teacher's features help early, while the student learns what to look at; late in
    training they pull it toward the teacher's weaknesses (its orientation is worse than
    the student's), so the student can finish on the ground truth alone.
    """
    if kd_until is None:
        return 1.0
    progress = step / max(1.0, kd_until * max_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if progress < 1.0 else 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _init_distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, created). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device, created


def _batches(dataset, sampler: DistributedSampler, batch_size: int, start_step: int, cfg: ModelConfig, workers: int):
    """Endless batches from ``start_step`` on: epoch e's order is the sampler's (seed, e)
    permutation, and a resumed run skips the batches it already consumed in that epoch."""
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise UserError(f"the split has {len(dataset)} samples: fewer than one batch of {batch_size} per process")
    step = start_step
    while True:
        epoch, skip = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * batch_size: per_epoch * batch_size]
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=True, num_workers=workers,
                            collate_fn=partial(collate, cfg=cfg))
        for batch in loader:
            yield batch
            step += 1


def _load_teacher(path: Path | None, student_cfg: ModelConfig, device) -> tuple[nn.Module | None, ModelConfig | None]:
    if path is None:
        return None, None
    teacher, ckpt = load_model(path, device)
    if ckpt.role != "teacher":
        raise UserError(f"--teacher {path} is a {ckpt.role} checkpoint; train one with `imkd train teacher`")
    tcfg = ckpt.run_config.model
    if tcfg.grid.to_dict() != student_cfg.grid.to_dict():
        raise UserError(f"teacher {path} uses BEV grid {tcfg.grid.to_dict()}, the student {student_cfg.grid.to_dict()}: "
                        "distillation compares BEV cells, so they must be equal")
    if tcfg.lidar_sweeps != student_cfg.lidar_sweeps:
        # the student run pillarises the LiDAR it feeds the teacher with its own config
        raise UserError(f"teacher {path} was trained on {tcfg.lidar_sweeps} LiDAR sweeps, the student config loads "
                        f"{student_cfg.lidar_sweeps}: pass --config with a ModelConfig/RunConfig JSON whose lidar_sweeps is "
                        f"{tcfg.lidar_sweeps}, or retrain the teacher with the student's config")
    teacher.requires_grad_(False)   # frozen: eval mode (from load_model) and no gradients
    return teacher, tcfg


def _average_buffers(module: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks. DDP only broadcasts buffers at the
    start of a forward, so after the last step each replica holds its own batch's stats."""
    world = dist.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[losses]}"), transient=False)


# Fields a resumed run may change: how long it runs and how often it logs/checkpoints.
_RESUMABLE_CHANGES = {"train.max_steps", "train.log_every", "train.ckpt_every", "train.num_workers"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """'field old -> new' for every field that differs and that a resume must not change."""
    a = _flatten(json.loads(old.to_json()))
    b = _flatten(json.loads(new.to_json()))
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in _RESUMABLE_CHANGES]


def distilled_from_other_teacher(saved: dict, teacher_sha: str | None) -> bool:
    """Whether a run's config.json records a teacher other than the checkpoint hashed to
    ``teacher_sha``. Runs that record none (plain students, or runs saved before the hash was
    recorded) cannot be told apart and count as the same."""
    recorded = saved.get("teacher_sha256")
    return recorded is not None and recorded != teacher_sha


def _check_same_teacher(saved_cfg: Path, teacher_ckpt, teacher_sha: str | None) -> None:
    """Refuse to resume a student against another teacher than the one it started with."""
    if teacher_sha is None or not saved_cfg.is_file():
        return
    saved = json.loads(saved_cfg.read_text())
    if distilled_from_other_teacher(saved, teacher_sha):
        raise UserError(f"{saved_cfg.parent} was trained against another teacher (sha256 {saved['teacher_sha256'][:12]}, now "
                        f"{teacher_sha[:12]} at {teacher_ckpt}); resuming it would silently mix two teachers: "
                        "use another --out, or delete that run to start over")


# --------------------------------------------------------------------------- the run
@dataclass
class TrainResult:
    checkpoint: Path        # out_dir/checkpoints/last.safetensors (written by rank 0)
    net: nn.Module          # this rank's trained network (DDP replicas are identical)
    step: int


def train(run_cfg: RunConfig, dataroot: str | Path | None, out_dir: str | Path, teacher_ckpt: str | Path | None = None,
          **kwargs) -> Path:
    """Train and return the last checkpoint's path; keyword arguments as :func:`fit`."""
    return fit(run_cfg, dataroot, out_dir, teacher_ckpt, **kwargs).checkpoint


def fit(run_cfg: RunConfig, dataroot: str | Path | None, out_dir: str | Path, teacher_ckpt: str | Path | None = None, *,
        role: str = "student", version: str = "v1.0-mini", split: str = "mini_train", resume: bool = True,
        stop_after: int | None = None, progress: bool = True, frames=None) -> TrainResult:
    """Train ``role`` for run_cfg.train.max_steps steps into ``out_dir``.

    ``resume``: continue from out_dir/checkpoints/last.safetensors when it exists (the
    result equals an uninterrupted run). ``stop_after``: stop (and checkpoint) after this
    many total steps, as an interruption would. ``frames``: an indexable of Frames to
    train on instead of ``dataroot``/``split``.
    """
    if role not in ("teacher", "student"):
        raise UserError(f"unknown role '{role}' (teacher|student)")
    tc, cfg = run_cfg.train, run_cfg.model
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / LAST
    rank, world, device, created = _init_distributed()
    try:
        seed_everything(tc.seed)

        # model and losses first: a bad --teacher fails before any data is read
        teacher, teacher_cfg = _load_teacher(Path(teacher_ckpt) if teacher_ckpt else None, cfg, device) if role == "student" else (None, None)
        criterion = IMKDCriterion(cfg, run_cfg.distill, role, teacher_cfg)
        if criterion.needs_teacher and teacher is None:
            raise UserError(f"--distill {run_cfg.distill.levels} needs a teacher: pass --teacher CKPT (or --distill none)")
        net = build_model(role, cfg, run_cfg.distill)
        if world > 1 and device.type == "cuda":   # per-GPU batches of 1-4 BEV samples are too small for BN stats
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        step_module = TrainStep(role, net, criterion).to(device)

        if frames is None:
            from imkd_deploy.data.loader import NuScenesDrive

            frames = NuScenesDrive(dataroot, version, cfg, split=split, load_lidar=True)
        skip = run_cfg.distill.skip_conditions if criterion.needs_teacher else frozenset()
        dataset = FrameDataset(frames, cfg, role, cache_size=len(frames), kd_skip=skip)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed, drop_last=True)

        optimizer = torch.optim.AdamW(step_module.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        # a teacher retrained into the same path is another teacher: the hash, not the path, names it
        teacher_sha = file_sha256(Path(teacher_ckpt)) if criterion.needs_teacher else None
        start = 0
        if resume and last.is_file():
            ckpt = load_checkpoint(last)
            if ckpt.role != role:
                raise UserError(f"{last} holds a {ckpt.role} run; cannot resume it as {role} (use another --out)")
            _check_same_teacher(out_dir / "config.json", teacher_ckpt, teacher_sha)
            changed = _config_changes(ckpt.run_config, run_cfg)
            if changed:
                raise UserError(f"{last} was trained with another config ({'; '.join(changed[:4])}); resuming it would "
                                "silently mix two runs: use another --out, or delete that run to start over")
            step_module.net.load_state_dict(ckpt.model)
            step_module.criterion.load_state_dict(ckpt.extra)
            state = load_train_state(last)
            if state["step"] != ckpt.step:
                raise UserError(f"{last} (step {ckpt.step}) and its training state (step {state['step']}) disagree")
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            start = ckpt.step
            if rank == 0:
                log.info("resuming %s from step %d", last, start)
        elif rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out_dir / "config.json", {"role": role, "run": run_cfg.to_dict(), "dataroot": str(dataroot),
                                                         "version": version, "split": split,
                                                         "teacher": str(teacher_ckpt) if teacher_ckpt else None,
                                                         "teacher_sha256": teacher_sha},
                              indent=2, sort_keys=True)
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)

        model = step_module
        if world > 1:
            model = nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
        use_amp = tc.amp == "bf16" or (tc.amp == "auto" and device.type == "cuda")
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else nullcontext()
        end = tc.max_steps if stop_after is None else min(tc.max_steps, stop_after)

        def save(step: int) -> None:
            if world > 1:
                _average_buffers(step_module)
            if rank != 0:
                return
            save_checkpoint(last, role=role, step=step, run_config=run_cfg, model=step_module.net,
                            extra=step_module.criterion,
                            train_state={"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()})

        bar = _progress(progress and rank == 0)
        task = bar.add_task(f"train {role}", total=tc.max_steps, completed=start, losses="") if bar else None
        metrics = (out_dir / "metrics.jsonl").open("a") if rank == 0 else None
        t0 = time.perf_counter()
        with bar or nullcontext():
            batches = _batches(dataset, sampler, tc.batch_size, start, cfg, tc.num_workers)
            for step in range(start, end):
                batch = move_targets(next(batches), device)
                lr = tc.lr * lr_factor(step, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                criterion.kd_scale = kd_factor(step, tc.max_steps, criterion.distill.kd_until)
                criterion.resp_scale = kd_factor(step, tc.max_steps, criterion.distill.resp_until)
                model.train()
                with torch.no_grad(), amp:
                    teacher_out = (teacher.forward_train(*teacher_args(batch, device),
                                                         structure_intensity=criterion.distill.lidar_weight == "structure")
                                   if criterion.needs_teacher else None)
                with amp:
                    terms = model(batch, teacher_out)
                optimizer.zero_grad(set_to_none=True)
                terms["total"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(step_module.parameters(), tc.grad_clip)
                optimizer.step()

                values = torch.stack([v.detach().float() for v in terms.values()])
                if world > 1:
                    dist.all_reduce(values)
                    values /= world
                record = {"step": step + 1, "lr": lr, **dict(zip(terms, values.tolist())), "grad_norm": float(grad_norm),
                          **({"kd_scale": criterion.kd_scale} if criterion.distill.kd_until is not None else {}),
                          **({"resp_scale": criterion.resp_scale} if criterion.distill.resp_until is not None else {}),
                          "elapsed_s": round(time.perf_counter() - t0, 3)}
                if rank == 0:
                    if (step + 1) % tc.log_every == 0 or step + 1 == end:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    if bar:
                        bar.update(task, advance=1, losses=" ".join(f"{k} {v:.3f}" for k, v in record.items() if k in terms))
                if (step + 1) % tc.ckpt_every == 0 and step + 1 < end:
                    save(step + 1)
        if rank == 0:
            metrics.close()
        if end > start:    # nothing new to save when resuming a finished run
            save(end)
        if world > 1:
            dist.barrier()
        return TrainResult(last, step_module.net, end)
    finally:
        if created:
            dist.destroy_process_group()


def resolve_run_config(config: str | Path, *, distill: str | None = None, max_steps: int | None = None,
                       seed: int | None = None, batch_size: int | None = None) -> RunConfig:
    """A preset name, a ModelConfig/RunConfig JSON, or a run dir's config.json -> RunConfig,
    with the command-line overrides applied (and validated)."""
    from imkd_deploy.config import ConfigError, load_model_config

    path = Path(str(config))
    try:
        if path.is_file():
            data = json.loads(path.read_text())
            data = data.get("run", data)                     # a run dir's config.json
            run = RunConfig.from_dict(data) if "model" in data and "train" in data else RunConfig(model=load_model_config(path))
        else:
            run = RunConfig(model=load_model_config(config))
        if distill is not None:
            run = run.replace(distill=run.distill.replace(levels=distill).to_dict())
        overrides = {k: v for k, v in (("max_steps", max_steps), ("seed", seed), ("batch_size", batch_size)) if v is not None}
        if overrides:
            run = run.replace(train=run.train.replace(**overrides).to_dict())
    except (ConfigError, json.JSONDecodeError) as exc:
        raise UserError(f"config {config}: {exc}") from None
    return run
