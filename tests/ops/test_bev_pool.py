"""BEVPool: geometry precompute + cache, torch reference, custom op (with gradients), numpy kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imkd_deploy.config import BEVGrid, tiny
from imkd_deploy.errors import UserError
from imkd_deploy.ops.bev_pool import (
    GeometryCache,
    bev_pool,
    bev_pool_numpy,
    bev_pool_reference,
    compute_geometry,
    depth_bin_centers,
    example_rig,
    stack_geometry,
)

CFG = tiny().replace(context_channels=5)


def _naive(depth, feat, geom):
    """Point by point, straight from the definition."""
    b, c = depth.shape[0], feat.shape[-1]
    ny, nx = geom.bev_hw
    out = np.zeros((b * ny * nx, c), np.float64)
    d_flat, f_rows = depth.reshape(-1), feat.reshape(-1, c)
    for rd, rf, rb in zip(geom.ranks_depth, geom.ranks_feat, geom.ranks_bev):
        out[rb] += d_flat[rd] * f_rows[rf]
    return out.reshape(b, ny, nx, c).transpose(0, 3, 1, 2)


def _inputs(batch, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fh, fw = CFG.feature_size
    depth = torch.rand(batch, CFG.num_cams, CFG.num_depth_bins, fh, fw, generator=gen, dtype=dtype)
    feat = torch.randn(batch, CFG.num_cams, fh, fw, CFG.context_channels, generator=gen, dtype=dtype)
    return depth, feat


def _rig(yaw_deg=0.0, shift=0.0):
    """example_rig turned about z and moved along x: a different calibration."""
    intr, c2e, aug = example_rig(CFG)
    c, s = np.cos(np.deg2rad(yaw_deg)), np.sin(np.deg2rad(yaw_deg))
    rot = np.array([[c, -s, 0, shift], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return intr, rot @ c2e, aug


def test_geometry_arrays_are_consistent():
    g = compute_geometry(*example_rig(CFG), CFG)
    fh, fw = CFG.feature_size
    assert g.num_points > 1000 and g.ranks_bev.dtype == np.int32
    assert np.all(np.diff(g.ranks_bev) >= 0)
    assert g.interval_lengths.sum() == g.num_points and g.interval_lengths.min() >= 1
    # every interval is one cell, and consecutive intervals are different cells
    assert np.all(g.ranks_bev[g.interval_starts] == g.ranks_bev[g.interval_starts + g.interval_lengths - 1])
    assert np.all(np.diff(g.ranks_bev[g.interval_starts]) > 0)
    # a depth rank and its feature rank name the same camera pixel
    cam_d = g.ranks_depth // (CFG.num_depth_bins * fh * fw)
    pix_d = g.ranks_depth % (fh * fw)
    assert np.array_equal(g.ranks_feat, cam_d * fh * fw + pix_d)
    assert not g.ranks_bev.flags.writeable


def test_point_on_optical_axis_lands_in_expected_cell():
    """Forward camera at (0.3, 0, 1) ego, principal point on feature cell (h0, w0)."""
    s = CFG.downsample
    fh, fw = CFG.feature_size
    h0, w0 = 3, 10
    k = np.array([[100.0, 0, w0 * s + (s - 1) / 2], [0, 100.0, h0 * s + (s - 1) / 2], [0, 0, 1]])
    c2e = np.eye(4)
    c2e[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # cam z -> ego x, cam x -> -ego y
    c2e[:3, 3] = [0.3, 0.0, 1.0]
    cfg = CFG.replace(num_cams=1)
    g = compute_geometry(k[None], c2e[None], np.eye(3)[None], cfg)
    centers = depth_bin_centers(cfg)                   # 3, 5, ..., 57 m
    assert centers[0] == pytest.approx(3.0) and centers[-1] == pytest.approx(57.0)
    on_axis = g.ranks_feat == h0 * fw + w0
    bins = (g.ranks_depth[on_axis] // (fh * fw)) % cfg.num_depth_bins
    cells = g.ranks_bev[on_axis]
    x = 0.3 + centers[bins]
    nx = cfg.grid.nx
    # grid -32..32 m at 1 m: x -> ix = floor(x + 32), y = 0 -> iy = 32
    assert np.array_equal(cells, 32 * nx + np.floor(x + 32).astype(int))
    # bins whose point is beyond x = 32 m fall outside the grid and are dropped
    assert sorted(bins.tolist()) == [d for d in range(cfg.num_depth_bins) if 0.3 + centers[d] < 32.0]
    assert cells[np.argmin(bins)] == 32 * nx + 35     # 3.3 m ahead -> ix 35


def test_rig_validation_names_the_problem():
    intr, c2e, aug = example_rig(CFG)
    with pytest.raises(UserError, match="cam2ego"):
        compute_geometry(intr, c2e[:3], aug, CFG)
    bad = intr.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        compute_geometry(bad, c2e, aug, CFG)


def test_geometry_cache_hits_and_misses_on_calibration():
    cache = GeometryCache(maxsize=2)
    rig = example_rig(CFG)
    g1 = cache.get(*rig, CFG)
    g2 = cache.get(*(a.copy() + 1e-9 for a in rig), CFG)  # below the 1e-6 rounding
    assert g1 is g2 and (cache.hits, cache.misses) == (1, 1)
    intr, c2e, aug = rig
    moved = c2e.copy()
    moved[0, 0, 3] += 0.4
    zoomed = intr.copy()
    zoomed[2, 0, 0] *= 1.01
    g3 = cache.get(intr, moved, aug, CFG)
    assert cache.misses == 2 and not np.array_equal(g3.ranks_bev, g1.ranks_bev)
    cache.get(zoomed, c2e, aug, CFG)
    cache.get(intr, c2e, aug * 1.001, CFG)       # img_aug is part of the key
    cache.get(intr, c2e, aug, CFG.replace(depth_bins=(2.0, 58.0, 4.0)))
    assert (cache.hits, cache.misses) == (1, 5)
    assert len(cache) == 2                          # LRU bound
    cache.get(*rig, CFG)                            # evicted long ago: recomputed
    assert cache.misses == 6


@pytest.mark.parametrize("impl", ["reference", "custom_op", "numpy"])
def test_bev_pool_matches_naive_loop_batch1_and_stacked(impl):
    g0 = compute_geometry(*_rig(), CFG)
    g1 = compute_geometry(*_rig(yaw_deg=17.0, shift=1.5), CFG)
    assert g0.num_points != g1.num_points
    for geom, batch in ((g0, 1), (stack_geometry([g0, g1]), 2)):
        depth, feat = _inputs(batch)
        ny, nx = geom.bev_hw
        if impl == "numpy":
            out = bev_pool_numpy(depth.numpy(), feat.numpy(), *geom.arrays(), ny, nx)
        else:
            fn = bev_pool_reference if impl == "reference" else lambda *a: bev_pool(*a[:-2], a[-2:])
            out = fn(depth, feat, *geom.to_torch(), ny, nx).numpy()
        expected = _naive(depth.numpy().astype(np.float64), feat.numpy().astype(np.float64), geom)
        assert out.shape == (batch, CFG.context_channels, ny, nx)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert np.abs(expected).sum() > 1.0  # the comparison is not between empty grids
    # stacking = pooling each sample on its own
    depth, feat = _inputs(2)
    both = bev_pool_reference(depth, feat, *stack_geometry([g0, g1]).to_torch(), *g0.bev_hw)
    for b, g in enumerate((g0, g1)):
        single = bev_pool_reference(depth[b:b + 1], feat[b:b + 1], *g.to_torch(), *g.bev_hw)
        torch.testing.assert_close(both[b:b + 1], single)


def test_stack_geometry_rejects_mismatched_shapes():
    g0 = compute_geometry(*example_rig(CFG), CFG)
    g1 = compute_geometry(*example_rig(CFG), CFG.replace(depth_bins=(2.0, 58.0, 4.0)))
    with pytest.raises(ValueError, match="sample 1"):
        stack_geometry([g0, g1])


def test_custom_op_gradcheck():
    # a coarse 4x4 grid keeps the analytic Jacobian (one backward per output element) small
    grid = BEVGrid((-16.0, 16.0), (-16.0, 16.0), (-5.0, 3.0), 8.0)
    cfg_small = CFG.replace(image_size=(32, 64), num_cams=2, depth_bins=(2.0, 30.0, 4.0), grid=grid)
    intr, c2e, aug = example_rig(cfg_small)
    geom = stack_geometry([compute_geometry(intr, c2e, aug, cfg_small)] * 2)
    ranks = geom.to_torch()
    fh, fw = cfg_small.feature_size
    gen = torch.Generator().manual_seed(1)
    depth = torch.rand(2, 2, cfg_small.num_depth_bins, fh, fw, dtype=torch.float64, generator=gen, requires_grad=True)
    feat = torch.randn(2, 2, fh, fw, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert geom.num_points > 20
    fn = lambda d, f: bev_pool(d, f, *ranks, geom.bev_hw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (depth, feat))
    # and the analytic backward agrees with autograd through the reference
    out_grad = torch.randn(2, 3, *geom.bev_hw, dtype=torch.float64, generator=gen)
    g_op = torch.autograd.grad(fn(depth, feat), (depth, feat), out_grad)
    g_ref = torch.autograd.grad(bev_pool_reference(depth, feat, *ranks, *geom.bev_hw), (depth, feat), out_grad)
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


def test_bev_pool_accepts_batched_bev_shape_and_empty_geometry():
    depth, feat = _inputs(1)
    empty = torch.zeros(0, dtype=torch.int32)
    out = bev_pool(depth, feat, empty, empty, empty, empty, empty, (1, 4, 6))
    assert out.shape == (1, CFG.context_channels, 4, 6) and out.abs().sum() == 0
    out_np = bev_pool_numpy(depth.numpy(), feat.numpy(), *(e.numpy() for e in [empty] * 5), 4, 6)
    assert out_np.shape == (1, CFG.context_channels, 4, 6) and not out_np.any()


def test_bad_ranks_raise_instead_of_reading_out_of_bounds():
    geom = compute_geometry(*example_rig(CFG), CFG)
    depth, feat = _inputs(1)
    rd, rf, rb, st, ln = geom.to_torch()
    too_far = rf.clone()
    too_far[5] = feat[0, ..., 0].numel()
    with pytest.raises(IndexError, match="ranks_feat"):
        bev_pool(depth, feat, rd, too_far, rb, st, ln, geom.bev_hw)
    with pytest.raises(ValueError, match="sorted"):
        bev_pool(depth, feat, rd, rf, rb.flip(0), st, ln, geom.bev_hw)
    with pytest.raises(ValueError, match="out of range"):
        bev_pool_numpy(depth.numpy(), feat.numpy(), rd.numpy(), too_far.numpy(), rb.numpy(), st.numpy(), ln.numpy(), *geom.bev_hw)


def test_low_precision_inputs_accumulate_in_fp32_and_keep_their_dtype():
    geom = compute_geometry(*example_rig(CFG), CFG)
    depth, feat = _inputs(1)
    ranks = geom.to_torch()
    out32 = bev_pool(depth, feat, *ranks, geom.bev_hw)
    out16 = bev_pool(depth.bfloat16(), feat.bfloat16(), *ranks, geom.bev_hw)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, rtol=2e-2, atol=5e-2)
    # mixed (AMP-style) inputs promote like the reference, and gradients keep input dtypes
    d16 = depth.bfloat16().requires_grad_()
    f32 = feat.clone().requires_grad_()
    mixed = bev_pool(d16, f32, *ranks, geom.bev_hw)
    assert mixed.dtype == bev_pool_reference(d16, f32, *ranks, *geom.bev_hw).dtype == torch.float32
    mixed.sum().backward()
    assert d16.grad.dtype == torch.bfloat16 and f32.grad.dtype == torch.float32
    assert d16.grad.abs().sum() > 0


@pytest.mark.gpu
def test_bev_pool_on_cuda_matches_the_cpu_reference():
    """The op on CUDA tensors (cuSPARSE CSR product), as the TensorRT plugin's enqueue runs it."""
    from imkd_deploy.ops.bev_pool import bev_pool_into

    cfg = tiny()
    geom = compute_geometry(*example_rig(cfg), cfg)
    g = torch.Generator().manual_seed(0)
    fh, fw = cfg.feature_size
    depth = torch.rand(1, cfg.num_cams, cfg.num_depth_bins, fh, fw, generator=g).softmax(2)
    feat = torch.randn(1, cfg.num_cams, fh, fw, cfg.context_channels, generator=g)
    ny, nx = geom.bev_hw
    ref = bev_pool_reference(depth, feat, *geom.to_torch(), ny, nx)
    out = torch.full((1, cfg.context_channels, ny, nx), float("nan"), device="cuda")
    bev_pool_into(depth.cuda(), feat.cuda(), *geom.to_torch("cuda"), out, ny, nx)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
