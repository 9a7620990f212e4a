"""BEVPool (BEVPoolv2 formulation): camera frustum features -> ego BEV grid, every implementation.

The view transform lifts each camera's depth distribution (N, D, fH, fW) and context
features (N, fH, fW, C) into frustum points, and sums ``depth * feat`` of every point
falling into a BEV cell. Which point lands in which cell depends only on the camera rig,
so it is precomputed once per rig (``compute_geometry``, cached by ``GeometryCache``) as
index arrays that the network takes as INPUTS:

    ranks_depth[p]  flat index into depth (B, N, D, fH, fW)
    ranks_feat[p]   flat index into the rows of feat (B, N, fH, fW, C)
    ranks_bev[p]    flat BEV cell b*ny*nx + iy*nx + ix, points sorted by it
    interval_starts / interval_lengths   runs of equal ranks_bev (one per occupied cell)

    out[b, :, iy, ix] = sum_{p: ranks_bev[p] = b*ny*nx + iy*nx + ix} depth[rd[p]] * feat[rf[p], :]

Geometry conventions (the depth supervision and the runtime rely on them):
- ``intrinsics`` are the NETWORK-pixel intrinsics (Frame keeps them updated for the
  resize/crop), so frustum pixels are unprojected with them directly; ``img_aug`` is
  informational and only enters the cache key.
- Feature cell (h, w) sits at network pixel (w*s + (s-1)/2, h*s + (s-1)/2), s = downsample:
  the centre of the s x s pixel block it summarises (pixel centres at integer coordinates).
- Depth bin d has centre lo + (d + 0.5) * step for cfg.depth_bins = (lo, hi, step), so bin d
  covers camera-frame depths (z, not range) in [lo + d*step, lo + (d+1)*step).
- BEV cell (iy, ix) covers x in [x0 + ix*cell, x0 + (ix+1)*cell), same for y; the BEV
  tensor is (C, ny, nx): rows are y, columns are x. Points outside the grid's x/y/z
  ranges are dropped.

Implementations, one section each below: geometry + cache (numpy), the torch reference,
the ``imkd::bev_pool`` torch.library op with autograd, the ONNX translations
(``plugin``: one imkd::BEVPool node; ``onnx``: standard ops), the ONNX Runtime kernel,
and (at the end) the TensorRT plugin section.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from onnxscript import DOUBLE, FLOAT, INT32, INT64, script
from onnxscript import opset18 as op

from imkd_deploy.config import ModelConfig
from imkd_deploy.errors import UserError
from imkd_deploy.ops._amp import fp32_under_autocast
from imkd_deploy.ops._onnx_common import IMKD_OPSET, PLUGIN_NAMESPACE, PLUGIN_VERSION, check_mode

# ---------------------------------------------------------------------------------------
# Geometry precompute (numpy) and its cache
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BEVPoolGeometry:
    """Index arrays for one sample (batch_size=1) or a stacked batch; all int32, read-only."""

    ranks_depth: np.ndarray
    ranks_feat: np.ndarray
    ranks_bev: np.ndarray
    interval_starts: np.ndarray
    interval_lengths: np.ndarray
    num_cams: int
    depth_bins: int
    feat_hw: tuple[int, int]
    bev_hw: tuple[int, int]
    batch_size: int = 1

    @property
    def num_points(self) -> int:
        return int(self.ranks_bev.shape[0])

    @property
    def num_intervals(self) -> int:
        return int(self.interval_starts.shape[0])

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The five index arrays in the op's argument order."""
        return (self.ranks_depth, self.ranks_feat, self.ranks_bev, self.interval_starts, self.interval_lengths)

    def to_torch(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
        """The five index arrays as int32 tensors (copies: the cached arrays stay read-only)."""
        return tuple(torch.tensor(a, dtype=torch.int32, device=device) for a in self.arrays())


def depth_bin_centers(cfg: ModelConfig) -> np.ndarray:
    """(D,) float64 depth-bin centres in metres (camera-frame z)."""
    lo, _, step = cfg.depth_bins
    return lo + (np.arange(cfg.num_depth_bins, dtype=np.float64) + 0.5) * step


def _intervals(ranks_bev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal values in a sorted rank array -> (starts, lengths), int32."""
    n = ranks_bev.shape[0]
    if n == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty.copy()
    change = np.flatnonzero(ranks_bev[1:] != ranks_bev[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(np.int32)
    lengths = np.diff(np.concatenate((starts, [n]))).astype(np.int32)
    return starts, lengths


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int32)
    a.setflags(write=False)
    return a


def _check_rig(intrinsics: np.ndarray, cam2ego: np.ndarray, img_aug: np.ndarray) -> tuple[np.ndarray, ...]:
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    cam2ego = np.asarray(cam2ego, dtype=np.float64)
    img_aug = np.asarray(img_aug, dtype=np.float64)
    n = intrinsics.shape[0] if intrinsics.ndim == 3 else -1
    expected = {"intrinsics": (intrinsics, (n, 3, 3)), "cam2ego": (cam2ego, (n, 4, 4)), "img_aug": (img_aug, (n, 3, 3))}
    for name, (arr, shape) in expected.items():
        if n < 1 or arr.shape != shape:
            raise UserError(
                f"camera rig: {name} must have shape (N, {', '.join(map(str, shape[1:]))}) with the same N "
                f"for intrinsics/cam2ego/img_aug; got intrinsics {intrinsics.shape}, cam2ego {cam2ego.shape}, "
                f"img_aug {img_aug.shape}"
            )
        if not np.isfinite(arr).all():
            raise UserError(f"camera rig: {name} contains NaN or inf")
    if np.any(np.abs(np.linalg.det(intrinsics)) < 1e-12):
        raise UserError("camera rig: an intrinsics matrix is singular (focal length 0?)")
    return intrinsics, cam2ego, img_aug


def compute_geometry(
    intrinsics: np.ndarray, cam2ego: np.ndarray, img_aug: np.ndarray, cfg: ModelConfig
) -> BEVPoolGeometry:
    """BEVPool index arrays for one sample's rig. See the module docstring for conventions."""
    intrinsics, cam2ego, _ = _check_rig(intrinsics, cam2ego, img_aug)
    n_cam = intrinsics.shape[0]
    fh, fw = cfg.feature_size
    s = cfg.downsample
    depths = depth_bin_centers(cfg)
    n_d = depths.shape[0]
    grid = cfg.grid
    nx, ny = grid.nx, grid.ny

    # Rays through the feature-cell centres, one per (cam, h, w): K^-1 [u, v, 1].
    u = np.arange(fw, dtype=np.float64) * s + (s - 1) / 2.0
    v = np.arange(fh, dtype=np.float64) * s + (s - 1) / 2.0
    uu, vv = np.meshgrid(u, v)                                          # (fH, fW)
    pix = np.stack([uu, vv, np.ones_like(uu)], axis=-1).reshape(-1, 3)  # (fH*fW, 3)
    rays = np.einsum("nij,pj->npi", np.linalg.inv(intrinsics), pix)     # (N, fH*fW, 3), z = 1
    # Ego-frame ray direction and origin, then points = origin + d * direction (d = cam z).
    rot, trans = cam2ego[:, :3, :3], cam2ego[:, :3, 3]
    dirs = np.einsum("nij,npj->npi", rot, rays)                          # (N, fH*fW, 3)
    pts = trans[:, None, None, :] + depths[None, :, None, None] * dirs[:, None, :, :]  # (N, D, fH*fW, 3)
    pts = pts.reshape(-1, 3)

    fx = (pts[:, 0] - grid.x_range[0]) / grid.cell
    fy = (pts[:, 1] - grid.y_range[0]) / grid.cell
    ix = np.floor(fx).astype(np.int64)
    iy = np.floor(fy).astype(np.int64)
    z = pts[:, 2]
    keep = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (z >= grid.z_range[0]) & (z < grid.z_range[1])

    # Frustum order is (n, d, h, w), so a point's flat index IS its depth rank.
    ranks_depth = np.flatnonzero(keep)
    pixel = ranks_depth % (fh * fw)
    cam = ranks_depth // (n_d * fh * fw)
    ranks_feat = cam * (fh * fw) + pixel
    ranks_bev = iy[keep] * nx + ix[keep]

    # Stable sort keeps points of one cell in frustum order: deterministic sums.
    order = np.argsort(ranks_bev, kind="stable")
    ranks_depth, ranks_feat, ranks_bev = ranks_depth[order], ranks_feat[order], ranks_bev[order]
    starts, lengths = _intervals(ranks_bev)
    return BEVPoolGeometry(
        ranks_depth=_frozen(ranks_depth),
        ranks_feat=_frozen(ranks_feat),
        ranks_bev=_frozen(ranks_bev),
        interval_starts=_frozen(starts),
        interval_lengths=_frozen(lengths),
        num_cams=n_cam,
        depth_bins=n_d,
        feat_hw=(fh, fw),
        bev_hw=(ny, nx),
    )


def stack_geometry(geometries: list[BEVPoolGeometry]) -> BEVPoolGeometry:
    """One geometry for a batch: sample b's ranks are offset into the b-th slice of each tensor."""
    if not geometries:
        raise ValueError("stack_geometry: need at least one geometry")
    g0 = geometries[0]
    shape = (g0.num_cams, g0.depth_bins, g0.feat_hw, g0.bev_hw)
    for i, g in enumerate(geometries):
        if (g.num_cams, g.depth_bins, g.feat_hw, g.bev_hw) != shape:
            raise ValueError(
                f"stack_geometry: sample {i} has (cams, D, feat_hw, bev_hw) = "
                f"{(g.num_cams, g.depth_bins, g.feat_hw, g.bev_hw)}, sample 0 has {shape}"
            )
    fh, fw = g0.feat_hw
    ny, nx = g0.bev_hw
    depth_size = g0.num_cams * g0.depth_bins * fh * fw
    feat_size = g0.num_cams * fh * fw
    bev_size = ny * nx
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("rd", "rf", "rb")}
    sample = 0
    for g in geometries:
        # A stacked input already holds its own per-sample offsets; shift it as a block.
        parts["rd"].append(g.ranks_depth.astype(np.int64) + sample * depth_size)
        parts["rf"].append(g.ranks_feat.astype(np.int64) + sample * feat_size)
        parts["rb"].append(g.ranks_bev.astype(np.int64) + sample * bev_size)
        sample += g.batch_size
    rd, rf, rb = (np.concatenate(parts[k]) for k in ("rd", "rf", "rb"))
    # Ranks must fit int32 (TensorRT and the ORT kernel take int32): fail loudly, never wrap.
    if sample * depth_size > np.iinfo(np.int32).max:
        raise ValueError(f"stack_geometry: batch {sample} x {depth_size} depth elements overflows int32 ranks")
    starts, lengths = _intervals(rb)
    return BEVPoolGeometry(
        ranks_depth=_frozen(rd),
        ranks_feat=_frozen(rf),
        ranks_bev=_frozen(rb),
        interval_starts=_frozen(starts),
        interval_lengths=_frozen(lengths),
        num_cams=g0.num_cams,
        depth_bins=g0.depth_bins,
        feat_hw=g0.feat_hw,
        bev_hw=g0.bev_hw,
        batch_size=sample,
    )


def geometry_key(intrinsics: np.ndarray, cam2ego: np.ndarray, img_aug: np.ndarray, cfg: ModelConfig) -> str:
    """SHA-1 of everything the index arrays depend on: the rig (to 1e-6) and the cfg's sizes."""
    h = hashlib.sha1()
    for arr in (intrinsics, cam2ego, img_aug):
        a = np.asarray(arr, dtype=np.float64)
        # +0.0 folds -0.0 into 0.0 so equal calibrations hash equal.
        r = np.round(a, 6) + 0.0
        h.update(repr(a.shape).encode())
        h.update(np.ascontiguousarray(r).tobytes())
    g = cfg.grid
    fields = (g.x_range, g.y_range, g.z_range, g.cell, cfg.depth_bins, cfg.image_size, cfg.downsample)
    h.update(repr(fields).encode())
    return h.hexdigest()


class GeometryCache:
    """LRU memo of compute_geometry keyed by geometry_key; a changed calibration misses."""

    def __init__(self, maxsize: int = 16):
        if maxsize < 1:
            raise ValueError(f"GeometryCache: maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[str, BEVPoolGeometry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._store)

    def get(self, intrinsics: np.ndarray, cam2ego: np.ndarray, img_aug: np.ndarray, cfg: ModelConfig) -> BEVPoolGeometry:
        key = geometry_key(intrinsics, cam2ego, img_aug, cfg)
        with self._lock:
            geom = self._store.get(key)
            if geom is not None:
                self._store.move_to_end(key)
                self.hits += 1
                return geom
        # Computed outside the lock: a rare duplicate computation beats serialising callers.
        geom = compute_geometry(intrinsics, cam2ego, img_aug, cfg)
        with self._lock:
            self.misses += 1
            self._store[key] = geom
            self._store.move_to_end(key)
            while len(self._store) > self.maxsize:
                self._store.popitem(last=False)
        return geom


def example_rig(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A nuScenes-like 6-camera rig at cfg.image_size: (intrinsics, cam2ego, img_aug).

    Focal lengths and mounting follow the nuScenes cameras (1600x900, f ~1266 px, back camera
    f ~800 px, yaws 0/-55/-110/180/110/55 deg, ~1.5 m high), resized to the network width and
    bottom-cropped to its height as BEVDepth does. For benchmarks, export dummies and tests.
    """
    h, w = cfg.image_size
    scale = w / 1600.0
    crop_top = 900.0 * scale - h
    yaws = np.deg2rad([0.0, -55.0, -110.0, 180.0, 110.0, 55.0])
    focals = [1266.0, 1260.0, 1256.0, 800.0, 1259.0, 1257.0]
    mounts = [(1.70, 0.0), (1.55, -0.49), (1.04, -0.48), (0.05, 0.0), (1.05, 0.48), (1.50, 0.49)]
    n = cfg.num_cams
    intr = np.zeros((n, 3, 3))
    c2e = np.tile(np.eye(4), (n, 1, 1))
    aug = np.tile(np.diag([scale, scale, 1.0]), (n, 1, 1))
    aug[:, 1, 2] = -crop_top
    # camera axes (x right, y down, z forward) in a forward-looking ego frame (x fwd, y left, z up)
    base = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    for i in range(n):
        k = i % 6
        f = focals[k] * scale
        intr[i] = [[f, 0.0, 800.0 * scale], [0.0, f, 450.0 * scale - crop_top], [0.0, 0.0, 1.0]]
        c, s = np.cos(yaws[k]), np.sin(yaws[k])
        c2e[i, :3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ base
        c2e[i, :3, 3] = (*mounts[k], 1.5)
    return intr, c2e, aug


# ---------------------------------------------------------------------------------------
# Torch reference
# ---------------------------------------------------------------------------------------


def _check_op_inputs(depth: torch.Tensor, feat: torch.Tensor) -> None:
    if depth.dim() != 5 or feat.dim() != 5:
        raise ValueError(f"bev_pool: depth must be (B,N,D,fH,fW) and feat (B,N,fH,fW,C); got {tuple(depth.shape)}, {tuple(feat.shape)}")
    b, n, _, fh, fw = depth.shape
    if tuple(feat.shape[:4]) != (b, n, fh, fw):
        raise ValueError(f"bev_pool: feat {tuple(feat.shape)} does not match depth {tuple(depth.shape)} in (B,N,fH,fW)")


def bev_pool_reference(
    depth: torch.Tensor,
    feat: torch.Tensor,
    ranks_depth: torch.Tensor,
    ranks_feat: torch.Tensor,
    ranks_bev: torch.Tensor,
    interval_starts: torch.Tensor,
    interval_lengths: torch.Tensor,
    ny: int,
    nx: int,
) -> torch.Tensor:
    """Plain torch: gather the frustum points, scatter-add them into the cells. (B, C, ny, nx).

    The intervals are not needed here (index_add needs no sort); they are accepted so
    every implementation shares one signature.
    """
    _check_op_inputs(depth, feat)
    b, c = depth.shape[0], feat.shape[-1]
    rd, rf, rb = ranks_depth.long(), ranks_feat.long(), ranks_bev.long()
    vals = depth.reshape(-1)[rd].unsqueeze(1) * feat.reshape(-1, c)[rf]
    out = vals.new_zeros(b * ny * nx, c).index_add_(0, rb, vals)
    return out.view(b, ny, nx, c).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------
# torch.library custom op (training + export), with autograd
# ---------------------------------------------------------------------------------------


# The op computes BEV pooling as what it is, a sparse-dense matmul. With points sorted by
# cell, S (cells x feature rows) in CSR form has crow = cumulative points per cell,
# col = ranks_feat and values = depth[ranks_depth]; out_rows = S @ feat_rows never
# materialises the (P, C) products (nuScenes size, 59 bins, 1 thread: ~11 ms vs ~90 ms for
# the reference's gather + index_add; benchmarks/bev_pool_bench.py). Backward:
# grad_feat = S^T @ grad_rows, grad_depth = SDDMM on S's pattern.


def _dtypes(depth: torch.Tensor, feat: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, accumulation dtype). Sparse kernels want fp32/fp64, and summing hundreds
    of points per cell in fp16 would lose precision anyway, so AMP inputs accumulate in fp32."""
    out = torch.promote_types(depth.dtype, feat.dtype)
    return out, (torch.float64 if out == torch.float64 else torch.float32)


def _pool_matrix(depth: torch.Tensor, ranks_depth, ranks_feat, ranks_bev, rows: int, cols: int) -> torch.Tensor:
    """S as CSR. CSR kernels do no bounds checks, so ranks_feat (the column indices) and the
    row order are checked here; bad ranks_depth fail in the gather, bad ranks_bev in bincount."""
    if ranks_bev.shape[0]:
        lo, hi = torch.aminmax(ranks_feat)
        if lo < 0 or hi >= cols:
            raise IndexError(f"bev_pool: ranks_feat spans [{int(lo)}, {int(hi)}], valid [0, {cols})")
        if not bool((ranks_bev[1:] >= ranks_bev[:-1]).all()):
            raise ValueError("bev_pool: ranks_bev must be sorted (use compute_geometry/stack_geometry)")
    index_dtype = torch.int32 if ranks_feat.dtype == torch.int32 else torch.int64
    crow = torch.zeros(rows + 1, dtype=index_dtype, device=depth.device)
    crow[1:] = torch.bincount(ranks_bev, minlength=rows).cumsum(0)
    values = depth.reshape(-1)[ranks_depth]
    with warnings.catch_warnings():  # "CSR support is in beta" is not news to a user of this op
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, ranks_feat.to(index_dtype), values, (rows, cols), check_invariants=False)


@torch.library.custom_op("imkd::bev_pool", mutates_args=())
def _bev_pool_op(
    depth: torch.Tensor,
    feat: torch.Tensor,
    ranks_depth: torch.Tensor,
    ranks_feat: torch.Tensor,
    ranks_bev: torch.Tensor,
    interval_starts: torch.Tensor,
    interval_lengths: torch.Tensor,
    ny: int,
    nx: int,
) -> torch.Tensor:
    out_dtype, acc = _dtypes(depth, feat)
    b, c = depth.shape[0], feat.shape[-1]
    feat_rows = feat.reshape(-1, c).to(acc)
    s = _pool_matrix(depth.to(acc), ranks_depth, ranks_feat, ranks_bev, b * ny * nx, feat_rows.shape[0])
    out = torch.sparse.mm(s, feat_rows)
    return out.view(b, ny, nx, c).permute(0, 3, 1, 2).to(out_dtype, memory_format=torch.contiguous_format)


@_bev_pool_op.register_fake
def _bev_pool_fake(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, ny, nx):
    return depth.new_empty(depth.shape[0], feat.shape[-1], ny, nx, dtype=_dtypes(depth, feat)[0])


def _bev_pool_setup_context(ctx, inputs, output):
    depth, feat, ranks_depth, ranks_feat, ranks_bev = inputs[:5]
    ctx.save_for_backward(depth, feat, ranks_depth, ranks_feat, ranks_bev)


def _bev_pool_backward(ctx, grad_out):
    depth, feat, ranks_depth, ranks_feat, ranks_bev = ctx.saved_tensors
    _, acc = _dtypes(depth, feat)
    c = feat.shape[-1]
    grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, c).to(acc)   # (B*ny*nx, C), row = BEV cell
    feat_rows = feat.reshape(-1, c).to(acc)
    s = _pool_matrix(depth.to(acc), ranks_depth, ranks_feat, ranks_bev, grad_rows.shape[0], feat_rows.shape[0])
    grad_depth = grad_feat = None
    if ctx.needs_input_grad[0]:
        # SDDMM on S's pattern: values in point order = dot(grad_rows[rb], feat_rows[rf])
        per_point = torch.sparse.sampled_addmm(s, grad_rows, feat_rows.t(), beta=0.0).values()
        grad_depth = per_point.new_zeros(depth.numel()).index_add_(0, ranks_depth, per_point)
        grad_depth = grad_depth.view(depth.shape).to(depth.dtype)
    if ctx.needs_input_grad[1]:
        grad_feat = torch.sparse.mm(s.t(), grad_rows).view(feat.shape).to(feat.dtype)
    return grad_depth, grad_feat, None, None, None, None, None, None, None


_bev_pool_op.register_autograd(_bev_pool_backward, setup_context=_bev_pool_setup_context)
fp32_under_autocast("imkd::bev_pool")


def bev_pool(
    depth: torch.Tensor,
    feat: torch.Tensor,
    ranks_depth: torch.Tensor,
    ranks_feat: torch.Tensor,
    ranks_bev: torch.Tensor,
    interval_starts: torch.Tensor,
    interval_lengths: torch.Tensor,
    bev_shape: tuple[int, int] | tuple[int, int, int],
) -> torch.Tensor:
    """The op the model calls: (B,N,D,fH,fW) x (B,N,fH,fW,C) -> (B, C, ny, nx) via imkd::bev_pool.

    ``bev_shape`` is (ny, nx) or (B, ny, nx); B always comes from depth's shape so exported
    graphs keep a dynamic batch. ny/nx become int attributes of the exported node.
    """
    if len(bev_shape) == 3:
        bev_shape = bev_shape[1:]
    ny, nx = (int(v) for v in bev_shape)
    _check_op_inputs(depth, feat)
    return _bev_pool_op(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, ny, nx)


# ---------------------------------------------------------------------------------------
# ONNX translations for torch.onnx.export(dynamo=True, custom_translation_table=...)
# ---------------------------------------------------------------------------------------

@script(IMKD_OPSET, default_opset=op)
def bev_pool_plugin(
    depth: FLOAT, feat: FLOAT, ranks_depth: INT32, ranks_feat: INT32, ranks_bev: INT32,
    interval_starts: INT32, interval_lengths: INT32, ny: int, nx: int,
) -> FLOAT:
    """--ops plugin: one imkd::BEVPool node; TensorRT finds its plugin by op type + namespace."""
    return IMKD_OPSET.BEVPool(
        depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
        ny=ny, nx=nx, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
    )


def _point_values(depth, feat, ranks_depth, ranks_feat):
    """(P, C) products depth[rd[p]] * feat[rf[p], :], and C as a 1-d shape tensor."""
    channels = op.Shape(feat, start=4, end=5)
    neg1 = op.Constant(value_ints=[-1])
    depth_pts = op.Gather(op.Reshape(depth, neg1), ranks_depth, axis=0)
    feat_pts = op.Gather(op.Reshape(feat, op.Concat(neg1, channels, axis=0)), ranks_feat, axis=0)
    return op.Mul(feat_pts, op.Unsqueeze(depth_pts, op.Constant(value_ints=[1]))), channels


def _write_cells(sums, depth, channels, ranks_bev, interval_starts, ny: int, nx: int):
    """(I, C) interval totals -> (B, C, ny, nx). One interval per occupied cell, so the plain
    ScatterND writes unique rows: no reduction, nothing for threads to race on. Rows go into a
    (B*ny*nx, C) buffer, transposed once at the end."""
    batch = op.Shape(depth, start=0, end=1)
    ny_t = op.Constant(value_ints=[ny])
    nx_t = op.Constant(value_ints=[nx])
    cells = op.Unsqueeze(op.Cast(op.Gather(ranks_bev, interval_starts, axis=0), to=INT64.dtype),
                         op.Constant(value_ints=[1]))
    zero = op.CastLike(op.Constant(value_float=0.0), sums)
    acc = op.Expand(zero, op.Concat(op.Mul(op.Mul(batch, ny_t), nx_t), channels, axis=0))
    acc = op.ScatterND(acc, cells, sums)
    grid = op.Reshape(acc, op.Concat(batch, ny_t, nx_t, channels, axis=0))
    return op.Transpose(grid, perm=[0, 3, 1, 2])


def _interval_last(interval_starts, interval_lengths):
    return op.Sub(op.Add(interval_starts, interval_lengths), op.CastLike(op.Constant(value_int=1), interval_starts))


# Points per block of the ``onnx`` lowering's float32 prefix sums: short enough that a block's
# running sum stays near the size of its values, long enough that the float64 pass over the
# block totals is small (287k points at nuScenes size: 1.1k blocks).
PREFIX_BLOCK = 256


# Traced (not @script), like the tensorrt lowering, so both share the helpers above.
def bev_pool_onnx(
    depth: FLOAT, feat: FLOAT, ranks_depth: INT32, ranks_feat: INT32, ranks_bev: INT32,
    interval_starts: INT32, interval_lengths: INT32, ny: int, nx: int,
) -> FLOAT:
    """--ops onnx: standard ops, deterministic. Points are sorted by cell, so a cell's total is
    a difference of two prefix sums, read at each interval's last and first point.

    A float32 prefix over 10^5 points loses ~1e-3 to cancellation, and a float64 one over all
    (P, C) values doubles the memory traffic of the whole op. So the prefix is split: float32
    CumSum inside blocks of ``PREFIX_BLOCK`` points, float64 (exclusive) CumSum over the block
    totals only. An interval's total = (carry of its last point's block - carry of its first
    point's block) in float64, plus the in-block prefixes' difference, which stays small.

    Not ScatterND(reduction=add): ONNX Runtime's CPU kernel splits the points across intra-op
    threads without atomics, so a cell whose points straddle two threads' shares loses updates
    now and then (onnxruntime#18048, #23396; ~1 run in 60 on the quickstart student at 2
    threads, errors up to 0.1 in the BEV features)."""
    # The point count is rounded up to whole blocks by padding the (P,) index arrays, not the
    # (P, C) values: padding the values was a fifth of the op's time. The padded points sit
    # after the last interval, so they only add to the last block's total, which no carry reads.
    block = op.Constant(value_ints=[PREFIX_BLOCK])
    n = op.Shape(ranks_depth)
    pads = op.Concat(op.Constant(value_ints=[0]), op.Mod(op.Sub(block, op.Mod(n, block)), block), axis=0)
    vals, channels = _point_values(depth, feat, op.Pad(ranks_depth, pads), op.Pad(ranks_feat, pads))
    blocks = op.Reshape(vals, op.Concat(op.Constant(value_ints=[-1]), block, channels, axis=0))
    inner = op.CumSum(blocks, op.Constant(value_int=1))
    totals = op.Cast(op.Gather(inner, op.Constant(value_int=PREFIX_BLOCK - 1), axis=1), to=DOUBLE.dtype)
    carry = op.CumSum(totals, op.Constant(value_int=0), exclusive=1)
    inner = op.Reshape(inner, op.Concat(op.Constant(value_ints=[-1]), channels, axis=0))

    last = _interval_last(interval_starts, interval_lengths)
    block_i = op.CastLike(op.Constant(value_int=PREFIX_BLOCK), interval_starts)
    between = op.Sub(op.Gather(carry, op.Div(last, block_i), axis=0),
                     op.Gather(carry, op.Div(interval_starts, block_i), axis=0))
    local = op.Add(op.Sub(op.Gather(inner, last, axis=0), op.Gather(inner, interval_starts, axis=0)),
                   op.Gather(vals, interval_starts, axis=0))
    sums = op.Add(op.Cast(between, to=FLOAT.dtype), local)
    return _write_cells(sums, depth, channels, ranks_bev, interval_starts, ny, nx)


def scan_steps(max_interval: int) -> int:
    """Doubling steps the ``tensorrt`` lowering needs to sum intervals up to ``max_interval`` points."""
    return max(1, int(np.ceil(np.log2(max(int(max_interval), 2)))))


def make_bev_pool_tensorrt(max_interval: int):
    """--ops tensorrt: standard ops WITHOUT scatter reductions, which TensorRT's ONNX parser
    rejects (TensorRT-RTX 1.7: "ScatterND with reduction is not supported", ScatterElements:
    "Unsupported reduction type"), and which plugins cannot replace there; nor CumSum in
    float64, which TensorRT does not run.

    Points are sorted by cell, so each cell's points are one contiguous interval. A segmented
    inclusive scan (Hillis-Steele: at step t every point adds the partial sum 2^t rows above
    it when that row is in the same cell) leaves each interval's total at its last point;
    one Gather picks those totals and a plain ScatterND writes them to their (unique) cells.
    Sums are pairwise, never a long prefix sum minus another, so fp32 error stays at the
    reference's level. The step count is static: intervals longer than ``2**steps`` points
    would be summed partially, so the export records the bound and the runtime checks it.
    Traced (not @script) so the loop over steps unrolls into plain nodes, no ONNX Loop.
    """
    steps = scan_steps(max_interval)

    def bev_pool_tensorrt(
        depth: FLOAT, feat: FLOAT, ranks_depth: INT32, ranks_feat: INT32, ranks_bev: INT32,
        interval_starts: INT32, interval_lengths: INT32, ny: int, nx: int,
    ) -> FLOAT:
        vals, channels = _point_values(depth, feat, ranks_depth, ranks_feat)
        zero_i = op.Constant(value_ints=[0])
        n = op.Shape(vals, start=0, end=1)
        minus_one = op.CastLike(op.Constant(value_int=-1), ranks_bev)   # no cell has rank -1
        for t in range(steps):
            k = 1 << t
            # row i - k (zeros / cell -1 above the first row): Pad on top, keep the first n rows
            shifted = op.Slice(op.Pad(vals, op.Constant(value_ints=[k, 0, 0, 0])), zero_i, n, zero_i)
            cell_above = op.Slice(op.Pad(ranks_bev, op.Constant(value_ints=[k, 0]), minus_one), zero_i, n, zero_i)
            same = op.Unsqueeze(op.Equal(ranks_bev, cell_above), op.Constant(value_ints=[1]))
            vals = op.Add(vals, op.Where(same, shifted, op.CastLike(op.Constant(value_float=0.0), vals)))
        sums = op.Gather(vals, _interval_last(interval_starts, interval_lengths), axis=0)
        return _write_cells(sums, depth, channels, ranks_bev, interval_starts, ny, nx)

    return bev_pool_tensorrt


def onnx_translations(mode: str, max_interval: int | None = None) -> dict:
    """{torch op overload: onnxscript function} for torch.onnx.export(custom_translation_table=...):
    mode "plugin" (imkd::BEVPool node), "onnx" (standard ops, blocked prefix sums: the fast
    deterministic path in ONNX Runtime) or "tensorrt" (standard ops TensorRT parses; needs the longest interval)."""
    check_mode(mode)
    if mode == "tensorrt":
        if max_interval is None:
            raise UserError("--ops tensorrt needs the longest BEVPool interval of the rig (max_interval)")
        return {torch.ops.imkd.bev_pool.default: make_bev_pool_tensorrt(max_interval)}
    return {torch.ops.imkd.bev_pool.default: bev_pool_plugin if mode == "plugin" else bev_pool_onnx}


# ---------------------------------------------------------------------------------------
# ONNX Runtime kernel (onnxruntime-extensions Python op), vectorised numpy
# ---------------------------------------------------------------------------------------


def bev_pool_numpy(
    depth: np.ndarray, feat: np.ndarray, ranks_depth: np.ndarray, ranks_feat: np.ndarray,
    ranks_bev: np.ndarray, interval_starts: np.ndarray, interval_lengths: np.ndarray, ny: int, nx: int,
) -> np.ndarray:
    """BEVPool in numpy/scipy as the CSR sparse-dense product (see the torch fast path);
    np.add.at / reduceat over the (P, C) products are 20-50x slower at nuScenes size."""
    from scipy import sparse  # a dependency of nuscenes-devkit (via scikit-learn)

    b, c = depth.shape[0], feat.shape[-1]
    rows = b * ny * nx
    feat_rows = feat.reshape(-1, c)
    n = ranks_bev.shape[0]
    if n and (ranks_bev.min() < 0 or ranks_bev.max() >= rows or ranks_feat.min() < 0
              or ranks_feat.max() >= feat_rows.shape[0] or np.any(ranks_bev[1:] < ranks_bev[:-1])):
        raise ValueError(f"imkd::BEVPool: ranks out of range for {b}x{ny}x{nx} cells / {feat_rows.shape[0]} "
                         "feature rows, or ranks_bev not sorted")
    if int(interval_lengths.sum(dtype=np.int64)) != n:
        raise ValueError(f"imkd::BEVPool: interval_lengths sum to {int(interval_lengths.sum())}, but there are {n} points")
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(ranks_bev, minlength=rows), out=indptr[1:])
    s = sparse.csr_matrix((depth.reshape(-1)[ranks_depth], ranks_feat, indptr), shape=(rows, feat_rows.shape[0]))
    out = np.asarray(s @ feat_rows, dtype=np.float32)
    return np.ascontiguousarray(out.reshape(b, ny, nx, c).transpose(0, 3, 1, 2))


_ORT_KERNEL_REGISTERED = False


def register_ort_kernel() -> None:
    """Declare the imkd::BEVPool Python kernel to onnxruntime-extensions (once per process)."""
    global _ORT_KERNEL_REGISTERED
    if _ORT_KERNEL_REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    i32, f32 = PyCustomOpDef.dt_int32, PyCustomOpDef.dt_float
    attrs = {
        "ny": PyCustomOpDef.dt_int64, "nx": PyCustomOpDef.dt_int64,
        "plugin_namespace": PyCustomOpDef.dt_string, "plugin_version": PyCustomOpDef.dt_string,
    }

    @onnx_op(op_type="imkd::BEVPool", inputs=[f32, f32, i32, i32, i32, i32, i32], outputs=[f32], attrs=attrs)
    def _bev_pool_kernel(depth, feat, rd, rf, rb, starts, lengths, **kwargs):
        return bev_pool_numpy(depth, feat, rd, rf, rb, starts, lengths, int(kwargs["ny"]), int(kwargs["nx"]))

    _ORT_KERNEL_REGISTERED = True


# ---------------------------------------------------------------------------------------
# TensorRT plugin (IPluginV3 for imkd::BEVPool) -- reserved for the engines helper.
# Node contract: domain "imkd", op_type "BEVPool", inputs (depth f32 (B,N,D,fH,fW),
# feat f32 (B,N,fH,fW,C), ranks_depth, ranks_feat, ranks_bev, interval_starts,
# interval_lengths: int32 1-D), attributes ny, nx (int), plugin_namespace="imkd",
# plugin_version="1"; output f32 (B, C, ny, nx).
# ---------------------------------------------------------------------------------------


def bev_pool_output_shape(depth_shape, feat_shape, ny: int, nx: int) -> tuple:
    """(B, C, ny, nx) from depth (B,N,D,fH,fW) and feat (B,N,fH,fW,C) shapes.

    Plain indexing only, so it serves ints here and TensorRT shape expressions inside the
    plugin's shape descriptor alike.
    """
    if len(depth_shape) != 5 or len(feat_shape) != 5:
        raise ValueError(f"imkd::BEVPool: depth and feat must be rank 5, got ranks {len(depth_shape)}, {len(feat_shape)}")
    if int(ny) < 1 or int(nx) < 1:
        raise ValueError(f"imkd::BEVPool: ny, nx must be >= 1, got {ny}, {nx}")
    return (depth_shape[0], feat_shape[4], int(ny), int(nx))


def bev_pool_into(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                  out: torch.Tensor, ny: int, nx: int) -> None:
    """The plugin's computation: overwrite `out` (TensorRT's output buffer) with the pooled BEV.

    The gather + index_add reference, not the CSR fast path: that one checks the ranks on the
    host, a device sync TensorRT's stream (and a CUDA graph around it) must not see.
    """
    out.copy_(bev_pool_reference(depth, feat, ranks_depth, ranks_feat, ranks_bev,
                                 interval_starts, interval_lengths, int(ny), int(nx)))


def register_tensorrt_plugin(trt_module) -> str | None:
    """Define imkd::BEVPool for NVIDIA TensorRT >= 10.6 (tensorrt.plugin); None where unavailable."""
    from imkd_deploy.engines.plugins import define_python_plugin

    return define_python_plugin(
        trt_module, "BEVPool",
        inputs=("depth", "feat", "ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths"),
        attrs={"ny": int, "nx": int},
        io_types="FP32, FP32, INT32, INT32, INT32, INT32, INT32, FP32",
        output_shape=bev_pool_output_shape,
        compute=bev_pool_into,
    )
