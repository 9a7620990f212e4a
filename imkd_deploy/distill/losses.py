"""Detection, depth and IMKD distillation losses (formulas: ARCHITECTURE.md, docs/method.md).

Functional losses first (each testable on its own), then :class:`IMKDCriterion`, the module
that owns the 1x1 adapters and combines the terms with the DistillConfig weights. Every
distillation term is a weighted mean of squared differences (or a KL), so it is >= 0 and
exactly 0 when the adapted student equals the teacher.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from imkd_deploy.config import DistillConfig, ModelConfig
from imkd_deploy.distill.depth_target import IGNORE
from imkd_deploy.model.backbone import conv_bn_relu
from imkd_deploy.model.head import HEAD_OUTPUTS

# CenterPoint's nuScenes regression weights: velocity is noisier, so it counts less.
REG_CODE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
REG_WEIGHT = 0.25
EPS = 1e-6


# --------------------------------------------------------------------------- detection
def gaussian_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet focal loss on heatmap logits against a Gaussian target; / number of centres.

    One global count over all classes. Normalising per class (CenterPoint's per-task
    normalisation, one class a task) was tried on the synthetic drive: rare-class AP rose
    a little, car/pedestrian/cone AP fell more (teacher, 300 steps: NDS 0.29 vs 0.34)."""
    logits = logits.float()
    pred = torch.sigmoid(logits)
    pos = target.eq(1.0).float()
    pos_loss = F.logsigmoid(logits) * (1 - pred).pow(alpha) * pos
    neg_loss = F.logsigmoid(-logits) * pred.pow(alpha) * (1 - target).pow(beta) * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / centre_count(target)


def centre_count(target: torch.Tensor) -> torch.Tensor:
    """GT centres (cells at exactly 1) in a Gaussian heatmap target, at least 1: the heatmap
    losses' normaliser."""
    return target.eq(1.0).sum().float().clamp_min(1.0)


def regression_maps(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's regression maps stacked in HEAD_OUTPUTS order: (B, 10, ny, nx)."""
    return torch.cat([out[k] for k in HEAD_OUTPUTS], dim=1).float()


def gather_regression(out: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Head maps -> (B, M, 10) predictions at flat cells ``index`` (B, M), HEAD_OUTPUTS order."""
    maps = regression_maps(out)
    b, c = maps.shape[:2]
    flat = maps.view(b, c, -1)
    return flat.gather(2, index[:, None, :].expand(b, c, index.shape[1])).transpose(1, 2)


def regression_l1(out: dict[str, torch.Tensor], index: torch.Tensor, mask: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    pred = gather_regression(out, index)
    w = pred.new_tensor(REG_CODE_WEIGHTS)
    err = (pred - reg).abs() * w * mask[..., None]
    return err.sum() / mask.sum().clamp_min(1.0)


def detection_loss(out: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
    return {
        "heatmap": gaussian_focal_loss(out["heatmap"], batch["heatmap"]),
        "reg": REG_WEIGHT * regression_l1(out, batch["index"], batch["mask"], batch["reg"]),
    }


def depth_loss(depth_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, N, D, fH, fW) logits vs (B, N, fH, fW) bin indices; cells
    without LiDAR (IGNORE) do not count. 0 when no cell has a target."""
    d = depth_logits.shape[2]
    logits = depth_logits.float().permute(0, 1, 3, 4, 2).reshape(-1, d)
    target = target.reshape(-1)
    valid = target != IGNORE
    ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    return (ce * valid).sum() / valid.sum().clamp_min(1)


# --------------------------------------------------------------------------- distillation
def standardise(feature: torch.Tensor) -> torch.Tensor:
    """Each channel of each sample to zero mean, unit variance over the BEV plane."""
    f = feature.float()
    mean = f.mean(dim=(2, 3), keepdim=True)
    std = f.std(dim=(2, 3), keepdim=True)
    return (f - mean) / (std + 1e-4)


def weighted_feature_mse(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, norm: bool = False) -> torch.Tensor:
    """sum_c w(c) * mean_ch (s - t)^2 / sum_c w(c). Mean over channels keeps the scale
    independent of the channel count, so one weight works for tiny and nuscenes_r50.
    ``norm`` compares standardised channels, so neither side's scale matters."""
    if norm:
        student, teacher = standardise(student), standardise(teacher)
    err = (student.float() - teacher.float()).pow(2).mean(dim=1, keepdim=True)
    return (weight * err).sum() / weight.sum().clamp_min(EPS)


def radar_distill_loss(adapted_radar: torch.Tensor, lidar_bev: torch.Tensor, lidar_intensity: torch.Tensor,
                       radar_occupancy: torch.Tensor, lambda_on: float, lambda_off: float, norm: bool = False) -> torch.Tensor:
    """Level 1: w_r(c) = I_L(c) * (lambda_on if radar hits c else lambda_off)."""
    w = lidar_intensity * (lambda_on * radar_occupancy + lambda_off * (1.0 - radar_occupancy))
    return weighted_feature_mse(adapted_radar, lidar_bev, w.detach(), norm)


def teacher_activation(feature: torch.Tensor) -> torch.Tensor:
    """mean_channels |F_T|, normalised to [0, 1] per sample: (B, 1, ny, nx)."""
    act = feature.float().abs().mean(dim=1, keepdim=True)
    return act / act.amax(dim=(2, 3), keepdim=True).clamp_min(EPS)


def fused_distill_loss(adapted_fused: torch.Tensor, teacher_feature: torch.Tensor, gt_heatmap: torch.Tensor,
                       heatmap_eps: float, norm: bool = False, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Level 2: w_f(c) = norm(mean_ch |F_T(c)|) * max(H(c) * g(c), eps), H = GT heatmap max over classes.

    g = 1, or ``gate`` (B, 1, ny, nx) (teacher_wins_box): an object cell where the teacher's box
    is the worse of the two gets only the background floor, so the student is not pulled toward
    the features behind it (level 2 alone costs the student velocity: docs/method.md)."""
    h = gt_heatmap.amax(dim=1, keepdim=True)
    if gate is not None:
        h = h * gate
    w = teacher_activation(teacher_feature) * h.clamp_min(heatmap_eps)
    return weighted_feature_mse(adapted_fused, teacher_feature, w.detach(), norm)


def response_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, num_centres: torch.Tensor | float,
                          gamma: float = 2.0, gt_heatmap: torch.Tensor | None = None) -> torch.Tensor:
    """Binary KL(teacher || student) of each class-heatmap cell, weighted by |p_t - p_s|^gamma,
    summed and divided by the number of GT centres.

    The normalisation is the focal loss's, so w_resp = 1 puts the term on the heatmap loss's
    scale. A plain mean over cells (before session 9) made it ~1e-3 of the detection loss: on a
    64x64x10 map nearly every cell is easy background. The weight is Quality Focal Loss's
    modulation (Li et al., GFL), detached like the other levels' weights: it chooses where to
    imitate, so the few cells where teacher and student disagree are not drowned by the many
    where both say "nothing".

    ``gt_heatmap`` (the GT Gaussians, per class) gates it like the regression term's
    ``resp_reg_gate``: a class cell counts only where the teacher's probability is nearer the GT
    heatmap than the student's, so the teacher's false positives and missed objects teach nothing
    (ungated heatmap imitation cost NDS in round 9; the teacher's heatmap is its strongest side)."""
    s, t = student_logits.float(), teacher_logits.float()
    p_t, p_s = torch.sigmoid(t), torch.sigmoid(s).detach()
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    w = (p_t - p_s).abs().pow(gamma).detach()
    if gt_heatmap is not None:
        w = w * ((p_t - gt_heatmap).abs() < (p_s - gt_heatmap).abs()).float()
    return (w * kl).sum() / torch.as_tensor(num_centres, dtype=torch.float32).clamp_min(1.0)


def kd_code_weights(skip: str = "") -> tuple[float, ...]:
    """CenterPoint's code weights with the channels of the "+"-separated head outputs ``skip`` at 0."""
    left_out = set(skip.split("+"))
    names = [name for name, c in HEAD_OUTPUTS.items() for _ in range(c)]
    return tuple(0.0 if name in left_out else w for name, w in zip(names, REG_CODE_WEIGHTS))


def dense_regression_targets(index: torch.Tensor, mask: torch.Tensor, reg: torch.Tensor, ny: int, nx: int) -> torch.Tensor:
    """The regression target of every BEV cell: that of the nearest GT centre (in cells), with
    the offset re-aimed from the cell to that centre. (B, 10, ny, nx); zeros without objects.

    The centre-cell targets (``index``/``mask``/``reg`` of build_targets) are all the batch
    holds; a neighbour of a centre that the decode reads needs the same box, seen from there."""
    b = index.shape[0]
    m = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    dense = reg.new_zeros(b, ny * nx, reg.shape[-1])
    if m == 0:
        return dense.transpose(1, 2).reshape(b, -1, ny, nx)
    idx, real = index[:, :m], mask[:, :m] > 0                       # build_targets packs objects first
    cy, cx = (idx // nx).float(), (idx % nx).float()
    cell = torch.arange(ny * nx, device=index.device)
    gy, gx = (cell // nx).float(), (cell % nx).float()
    d2 = (gx[None, :, None] - cx[:, None, :]).pow(2) + (gy[None, :, None] - cy[:, None, :]).pow(2)
    owner = d2.masked_fill(~real[:, None, :], float("inf")).argmin(dim=2)      # (B, P)
    dense = reg[:, :m].gather(1, owner[..., None].expand(-1, -1, reg.shape[-1])).clone()
    dense[..., 0] += cx.gather(1, owner) - gx[None]
    dense[..., 1] += cy.gather(1, owner) - gy[None]
    dense = dense * real.any(dim=1)[:, None, None]                  # a sample without boxes has no owner
    return dense.transpose(1, 2).reshape(b, -1, ny, nx)


def per_output_l1(maps: torch.Tensor, target: torch.Tensor, code_weights: tuple[float, ...] = REG_CODE_WEIGHTS) -> torch.Tensor:
    """Code-weighted L1 of each head output, its channels summed: (B, len(HEAD_OUTPUTS), ny, nx)."""
    err = (maps - target).abs() * target.new_tensor(code_weights).view(1, -1, 1, 1)
    return torch.cat([e.sum(dim=1, keepdim=True) for e in err.split(list(HEAD_OUTPUTS.values()), dim=1)], dim=1)


def teacher_wins(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                 code_weights: tuple[float, ...] = REG_CODE_WEIGHTS) -> torch.Tensor:
    """1 where the teacher's regression of a head output is closer to ``target`` than the
    student's (per_output_l1), else 0: one map per output, (B, len(HEAD_OUTPUTS), ny, nx)."""
    return (per_output_l1(teacher, target, code_weights) < per_output_l1(student, target, code_weights)).float()


def teacher_wins_box(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 where the teacher's whole box (per_output_l1 summed over the head outputs) is closer to
    ``target`` than the student's, else 0: (B, 1, ny, nx)."""
    return (per_output_l1(teacher, target).sum(dim=1, keepdim=True)
            < per_output_l1(student, target).sum(dim=1, keepdim=True)).float()


def response_regression_loss(student_out: dict[str, torch.Tensor], teacher_out: dict[str, torch.Tensor],
                             gt_heatmap: torch.Tensor, code_weights: tuple[float, ...] = REG_CODE_WEIGHTS,
                             gate_target: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between the student's and the teacher's regression maps (CenterPoint's code weights),
    weighted by the GT heatmap's Gaussian (max over classes) and divided by its sum.

    The detection loss supervises regression only at the GT centre cell. The decode reads the
    peak cell, which for a student is often a neighbour; there the teacher's outputs (its
    velocity and localisation are far better than the student's) are the only target.
    ``code_weights`` (kd_code_weights) can leave out what the teacher does worse, such as heading.
    ``gate_target`` (dense_regression_targets) keeps a head output's term only at the cells
    where the teacher is the closer of the two to it (Chen et al. 2017's teacher-bounded
    regression, per cell): the teacher's heading and attributes are no better than the
    student's overall, but are at some cells, and the gate finds which."""
    student, teacher = regression_maps(student_out), regression_maps(teacher_out).detach()
    keep = None
    if gate_target is not None:
        win = teacher_wins(student.detach(), teacher, gate_target, code_weights)
        keep = win.repeat_interleave(torch.tensor(list(HEAD_OUTPUTS.values()), device=win.device), dim=1)
    return gaussian_weighted_l1(student, teacher, gt_heatmap, code_weights, keep)


def dense_regression_loss(out: dict[str, torch.Tensor], dense_target: torch.Tensor, gt_heatmap: torch.Tensor) -> torch.Tensor:
    """The detection loss's regression L1 at every cell of the GT Gaussians instead of the centre
    cell only, against ``dense_target`` (dense_regression_targets), weighted like the regression KD.

    The control for that term: it gives the student the same dense supervision from the ground
    truth alone, so what the teacher adds beyond density can be told apart."""
    return gaussian_weighted_l1(regression_maps(out), dense_target, gt_heatmap)


def gaussian_weighted_l1(maps: torch.Tensor, target: torch.Tensor, gt_heatmap: torch.Tensor,
                         code_weights: tuple[float, ...] = REG_CODE_WEIGHTS, keep: torch.Tensor | None = None) -> torch.Tensor:
    """sum_c H(c) * sum_k w_k |maps - target|_k(c) / sum_c H(c), with H the GT heatmap (max over
    classes) and w the code weights; ``keep`` (0/1 per channel and cell) drops channels' cells."""
    w = gt_heatmap.amax(dim=1, keepdim=True).detach()
    diff = (maps - target).abs() * gt_heatmap.new_tensor(code_weights).view(1, -1, 1, 1)
    if keep is not None:
        diff = diff * keep
    return (w * diff.sum(dim=1, keepdim=True)).sum() / w.sum().clamp_min(EPS)


def make_adapter(c_in: int, c_out: int, kind: str) -> nn.Module:
    """Student channels -> teacher channels. "conv" gives the adapter a 3x3 receptive field and
    a non-linearity, so it can absorb part of the radar/camera-to-LiDAR gap that a 1x1 map
    leaves for the student's own layers to close."""
    if kind == "linear":
        return nn.Conv2d(c_in, c_out, 1)
    return nn.Sequential(conv_bn_relu(c_in, c_out, 3), nn.Conv2d(c_out, c_out, 1))


class IMKDCriterion(nn.Module):
    """All training losses of one role, with the distillation adapters (trained, not exported).

    Adapters exist only for enabled levels, so DDP never sees unused parameters."""

    def __init__(self, cfg: ModelConfig, distill: DistillConfig, role: str, teacher_cfg: ModelConfig | None = None):
        super().__init__()
        teacher_cfg = teacher_cfg or cfg
        self.role = role
        self.distill = distill
        student = role == "student"
        self.use_radar = student and distill.enabled("radar") and distill.w_radar > 0
        self.use_fused = student and distill.enabled("fused") and distill.w_fused > 0
        self.use_resp = student and distill.enabled("resp") and distill.w_resp > 0
        self.use_resp_reg = student and distill.enabled("resp") and distill.w_resp_reg > 0
        self.resp_reg_code = kd_code_weights(distill.resp_reg_skip)
        # kd_channels < 1: the adapters read only the first channels, so the rest carry what the
        # teacher lacks (radar Doppler: the LiDAR teacher's velocity is worse than the student's)
        # without being pulled toward the teacher's features.
        self.radar_in = max(1, round(cfg.radar_channels * distill.kd_channels))
        self.radar_adapter = make_adapter(self.radar_in, teacher_cfg.lidar_channels, distill.adapter) if self.use_radar else None
        self.fused_key = "feature" if distill.fused_at == "encoder" else "fused"
        self.fused_in = max(1, round((cfg.bev_encoder_channels if distill.fused_at == "encoder" else cfg.fused_channels)
                                     * distill.kd_channels))
        self.fused_adapter = (make_adapter(self.fused_in, teacher_cfg.bev_encoder_channels, distill.adapter)
                              if self.use_fused else None)
        self.kd_scale = 1.0     # the trainer sets both each step (DistillConfig.kd_until, resp_until)
        self.resp_scale = 1.0

    @property
    def needs_teacher(self) -> bool:
        return self.use_radar or self.use_fused or self.use_resp or self.use_resp_reg

    def forward(self, out: dict[str, torch.Tensor], batch: dict, teacher: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        d = self.distill
        terms = detection_loss(out, batch)
        weights = {"heatmap": 1.0, "reg": 1.0}
        if self.role == "student":
            terms["depth"] = depth_loss(out["depth_logits"], batch["depth_target"])
            weights["depth"] = d.w_depth
        if d.w_dense_reg > 0 or (self.use_resp_reg and d.resp_reg_gate) or (self.use_fused and d.fused_gate):
            # the ground truth at every cell: the dense regression loss's target, and that of the
            # gates that compare teacher and student (in the batch, so kd_keep's rows take it along)
            batch = {**batch, "dense_target": dense_regression_targets(batch["index"], batch["mask"], batch["reg"],
                                                                       *batch["heatmap"].shape[-2:])}
        if d.w_dense_reg > 0:
            terms["dense_reg"] = REG_WEIGHT * dense_regression_loss(out, batch["dense_target"], batch["heatmap"])
            weights["dense_reg"] = d.w_dense_reg
        if self.needs_teacher and teacher is None:
            raise ValueError("distillation levels are enabled but no teacher outputs were given")
        kd_terms, kept = len(terms), True
        if "kd_keep" in batch and self.needs_teacher:
            # Samples of DistillConfig.kd_skip's conditions leave every distillation term; the rest
            # keep their own normalisation, so a half-skipped batch is not a half-weighted one. A
            # batch with none left still computes the terms, times 0, so that the adapters take
            # part in every step (DDP expects each parameter to receive a gradient).
            rows = batch["kd_keep"].nonzero().flatten()
            if 0 < len(rows) < len(batch["kd_keep"]):
                out, batch, teacher = (_rows(x, rows, len(batch["kd_keep"])) for x in (out, batch, teacher))
            kept = len(rows) > 0
        if self.use_radar:
            terms["radar_kd"] = radar_distill_loss(self.radar_adapter(out["radar_bev"][:, :self.radar_in]), teacher["lidar_bev"],
                                                   teacher["lidar_intensity"],
                                                   out["radar_occupancy"], d.lambda_on, d.lambda_off,
                                                   d.feature_norm)
            weights["radar_kd"] = d.w_radar * self.kd_scale
        dense = batch.get("dense_target")
        if self.use_fused:
            gate = (teacher_wins_box(regression_maps(out).detach(), regression_maps(teacher), dense)
                    if d.fused_gate else None)
            terms["fused_kd"] = fused_distill_loss(self.fused_adapter(out[self.fused_key][:, :self.fused_in]), teacher["feature"],
                                                   batch["heatmap"], d.heatmap_eps, d.feature_norm, gate)
            weights["fused_kd"] = d.w_fused * self.kd_scale
        if self.use_resp:
            terms["resp_kd"] = response_distill_loss(out["heatmap"], teacher["heatmap"], centre_count(batch["heatmap"]),
                                                     gt_heatmap=batch["heatmap"] if d.resp_gate else None)
            weights["resp_kd"] = d.w_resp * self.resp_scale
        if self.use_resp_reg:
            terms["resp_reg_kd"] = REG_WEIGHT * response_regression_loss(out, teacher, batch["heatmap"], self.resp_reg_code,
                                                                         dense if d.resp_reg_gate else None)
            weights["resp_reg_kd"] = d.w_resp_reg * self.resp_scale
        if not kept:
            terms.update({k: v * 0.0 for k, v in list(terms.items())[kd_terms:]})
        terms["total"] = sum(weights[k] * v for k, v in terms.items())
        return terms


def _rows(tensors: dict, rows: torch.Tensor, batch_size: int) -> dict:
    """The batch entries of ``rows`` (tensors whose first dimension is the batch; others as they are)."""
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch_size else v
            for k, v in tensors.items()}
