"""Both imkd ops through torch.onnx.export(dynamo=True) in both ops modes, run by ONNX Runtime."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from imkd_deploy.config import tiny
from imkd_deploy.errors import UserError
from imkd_deploy.ops import onnx_translation_table, register_ort_kernels
from imkd_deploy.ops.bev_pool import (
    PREFIX_BLOCK, bev_pool, bev_pool_reference, compute_geometry, example_rig, stack_geometry,
)
from imkd_deploy.ops.intensity_fusion import IntensityFusion

CFG = tiny().replace(context_channels=6)
RADAR_CH = 4
INPUT_NAMES = ["depth", "feat", "ranks_depth", "ranks_feat", "ranks_bev", "interval_starts",
               "interval_lengths", "radar", "intensity"]


class PoolAndFuse(torch.nn.Module):
    """BEVPool then IntensityFusion, the way the student uses them."""

    def __init__(self):
        super().__init__()
        self.bev_hw = (CFG.grid.ny, CFG.grid.nx)
        self.fuse = IntensityFusion(CFG.context_channels, RADAR_CH, 5)

    def forward(self, depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, radar, intensity):
        cam = bev_pool(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, self.bev_hw)
        return self.fuse(cam, radar, intensity)


def _rig(yaw_deg):
    intr, c2e, aug = example_rig(CFG)
    c, s = np.cos(np.deg2rad(yaw_deg)), np.sin(np.deg2rad(yaw_deg))
    turn = np.array([[c, -s, 0, 0.7], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return intr, turn @ c2e, aug


def _inputs(geom, seed):
    gen = torch.Generator().manual_seed(seed)
    b = geom.batch_size
    fh, fw = CFG.feature_size
    ny, nx = geom.bev_hw
    depth = torch.rand(b, CFG.num_cams, CFG.num_depth_bins, fh, fw, generator=gen).softmax(2)
    feat = torch.randn(b, CFG.num_cams, fh, fw, CFG.context_channels, generator=gen)
    radar = torch.randn(b, RADAR_CH, ny, nx, generator=gen)
    intensity = torch.rand(b, 1, ny, nx, generator=gen)
    return (depth, feat, *geom.to_torch(), radar, intensity)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = PoolAndFuse().eval()
    args = _inputs(compute_geometry(*_rig(0.0), CFG), seed=0)
    batch, points, cells = torch.export.Dim("B"), torch.export.Dim("P"), torch.export.Dim("K")
    dyn = dict(zip(INPUT_NAMES, [{0: batch}, {0: batch}, {0: points}, {0: points}, {0: points},
                                 {0: cells}, {0: cells}, {0: batch}, {0: batch}]))
    paths = {}
    # the scan lowering's bound: the longest interval of any rig (and batch) the tests run
    longest = max(int(compute_geometry(*_rig(y), CFG).interval_lengths.max()) for y in (0.0, 23.0, -40.0))
    for mode in ("plugin", "onnx", "tensorrt"):
        path = tmp_path_factory.mktemp("onnx") / f"pool_fuse_{mode}.onnx"
        table = onnx_translation_table(mode, longest if mode == "tensorrt" else None)
        program = torch.onnx.export(model, args, dynamo=True, input_names=INPUT_NAMES, dynamic_shapes=dyn,
                                    custom_translation_table=table, verbose=False)
        program.save(str(path))
        paths[mode] = path
    return model, paths


def _session(path, mode):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if mode == "plugin":
        register_ort_kernels(opts)
        register_ort_kernels(opts)  # idempotent: a second registration must not break the session
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _one_plain_scatter(model) -> bool:
    """One Scatter* node, without a reduction: BEVPool writes each cell's total once."""
    scatters = [n for n in model.graph.node if n.op_type.startswith("Scatter")]
    return len(scatters) == 1 and all(a.name != "reduction" or a.s == b"none" for a in scatters[0].attribute)


def test_plugin_graph_has_imkd_nodes_with_plugin_attributes(exported):
    _, paths = exported
    model = onnx.load(str(paths["plugin"]))
    onnx.checker.check_model(model, full_check=False)
    imkd = {n.op_type: n for n in model.graph.node if n.domain == "imkd"}
    assert set(imkd) == {"BEVPool", "IntensityFusion"}
    for node in imkd.values():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"imkd" and attrs["plugin_version"] == b"1"
    pool_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in imkd["BEVPool"].attribute}
    assert (pool_attrs["ny"], pool_attrs["nx"]) == (CFG.grid.ny, CFG.grid.nx)
    assert any(o.domain == "imkd" for o in model.opset_import)


def test_onnx_mode_uses_standard_ops_only(exported):
    _, paths = exported
    model = onnx.load(str(paths["onnx"]))
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    # no scatter reduction: ONNX Runtime's CPU ScatterND(add) races across intra-op threads
    assert _one_plain_scatter(model)
    assert {"Conv", "Sigmoid", "Sub", "CumSum"} <= {n.op_type for n in model.graph.node}


def test_onnx_mode_is_deterministic_and_exact_with_threads(exported):
    """The same input twenty times at 2 intra-op threads: bit-identical outputs, each within
    float32 rounding of a float64 evaluation of the same module."""
    model, paths = exported
    sess = _session(paths["onnx"], "onnx")
    args = _inputs(stack_geometry([compute_geometry(*_rig(23.0), CFG), compute_geometry(*_rig(-40.0), CFG)]), seed=3)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(*(a.double() if a.is_floating_point() else a for a in args)).numpy()
    feeds = {name: a.numpy() for name, a in zip(INPUT_NAMES, args)}
    runs = [sess.run(None, feeds)[0] for _ in range(20)]
    assert all(np.array_equal(r, runs[0]) for r in runs[1:])
    np.testing.assert_allclose(runs[0], exact, rtol=1e-6, atol=1e-6)


def test_tensorrt_mode_has_no_scatter_reduction(exported):
    _, paths = exported
    model = onnx.load(str(paths["tensorrt"]))
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert not any(n.op_type == "Loop" for n in model.graph.node)       # the scan is unrolled
    assert _one_plain_scatter(model)


@pytest.mark.parametrize("mode", ["plugin", "onnx", "tensorrt"])
def test_ort_matches_torch_on_other_geometries(exported, mode):
    model, paths = exported
    sess = _session(paths[mode], mode)
    g_a = compute_geometry(*_rig(23.0), CFG)
    g_b = compute_geometry(*_rig(-40.0), CFG)
    g_export = compute_geometry(*_rig(0.0), CFG)
    assert len({g_a.num_points, g_b.num_points, g_export.num_points}) == 3  # really other lengths
    for geom, seed in ((g_a, 1), (stack_geometry([g_a, g_b]), 2)):
        args = _inputs(geom, seed)
        with torch.no_grad():
            expected = model(*args).numpy()
        (got,) = sess.run(None, {name: a.numpy() for name, a in zip(INPUT_NAMES, args)})
        assert got.shape == expected.shape == (geom.batch_size, 5, CFG.grid.ny, CFG.grid.nx)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="plugin\\|onnx\\|tensorrt"):
        onnx_translation_table("trt")


class _PoolOnly(torch.nn.Module):
    def __init__(self, bev_hw):
        super().__init__()
        self.bev_hw = bev_hw

    def forward(self, depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths):
        return bev_pool(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, self.bev_hw)


def _blocky_geometry(lengths, depth_size, feat_size, rng):
    """Intervals of the given lengths, one per cell, with random depth/feature indices."""
    lengths = np.asarray(lengths, dtype=np.int32)
    points = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    ranks_bev = np.repeat(np.arange(len(lengths), dtype=np.int32) * 3, lengths)   # every third cell
    rd = rng.integers(0, depth_size, points).astype(np.int32)
    rf = rng.integers(0, feat_size, points).astype(np.int32)
    return rd, rf, ranks_bev, starts, lengths


def test_onnx_mode_sums_across_prefix_block_edges(tmp_path):
    """The ``onnx`` lowering sums in float32 blocks of PREFIX_BLOCK points with float64 carries:
    intervals that start or end on a block edge, span several blocks, or fill the last block
    exactly (no padding) equal a float64 sum to float32 rounding (rtol 2e-6; measured 6e-7).
    Features of ~100 make the running sum reach ~3e4: one float32 prefix over the whole array
    (PREFIX_BLOCK set past the point count) is off by 2.2e-5 relative here, a lost carry by a
    whole block's total."""
    block = PREFIX_BLOCK
    ny, nx, d, h, w, c = 16, 16, 4, 3, 5, 7
    rng = np.random.default_rng(0)
    cases = {
        "edges": [1, block - 2, 1, block, 3 * block + 5, 1, 1],          # ends/starts on edges, one spans 4 blocks
        "exact": [block - 1, 1, 2 * block],                                # points a multiple of the block: no pad
        "one past": [block, block, 1],                                     # a last block of one point
    }
    module = _PoolOnly((ny, nx)).eval()
    depth = torch.rand(1, 1, d, h, w, generator=torch.Generator().manual_seed(0)).softmax(2)
    feat = 100.0 + torch.rand(1, 1, h, w, c, generator=torch.Generator().manual_seed(1))
    first = [torch.from_numpy(a) for a in _blocky_geometry(cases["edges"], d * h * w, h * w, rng)]
    points, cells = torch.export.Dim("P"), torch.export.Dim("K")
    program = torch.onnx.export(module, (depth, feat, *first), dynamo=True, verbose=False,
                                dynamic_shapes=(None, None, {0: points}, {0: points}, {0: points}, {0: cells}, {0: cells}),
                                custom_translation_table=onnx_translation_table("onnx"))
    program.save(str(tmp_path / "pool.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "pool.onnx"), providers=["CPUExecutionProvider"])
    for name, lengths in cases.items():
        geom = _blocky_geometry(lengths, d * h * w, h * w, rng)
        assert (sum(lengths) % block == 0) == (name == "exact")
        (got,) = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], (depth.numpy(), feat.numpy(), *geom))))
        exact = bev_pool_reference(depth.double(), feat.double(), *map(torch.from_numpy, geom), ny, nx).numpy()
        np.testing.assert_allclose(got, exact, rtol=2e-6, atol=0, err_msg=name)
