"""IntensityFusion (IMKD level 3): camera/radar BEV fusion gated by the radar intensity prior.

    g = sigmoid(gate_w . [F_C, F_R, I_R] + gate_b)          one gate per BEV cell, (B, 1, Y, X)
    F = out_w . [g * F_C, (1 - g) * F_R] + out_b              (B, Co, Y, X)

``.`` is a 1x1 convolution over channels. I_R is the radar intensity map (RCS-weighted
occupancy, normalised), so where radar returns are strong and reliable the gate can lean on
F_R, elsewhere on the camera. The op is linear at its output: the model adds BN/ReLU after.

Implementations, one section each: torch reference, the ``imkd::intensity_fusion``
torch.library op with an analytic backward, ONNX translations (``plugin``: one
imkd::IntensityFusion node; ``onnx``: Concat/Conv/Sigmoid/Mul/Sub), the ONNX Runtime kernel,
the ``IntensityFusion`` module owning the parameters, and (at the end) the TensorRT plugin
section.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from onnxscript import FLOAT, script
from onnxscript import opset18 as op
from torch import nn

from imkd_deploy.ops._amp import fp32_under_autocast
from imkd_deploy.ops._onnx_common import IMKD_OPSET, PLUGIN_NAMESPACE, PLUGIN_VERSION, check_mode

# ---------------------------------------------------------------------------------------
# Torch reference
# ---------------------------------------------------------------------------------------


def _check_inputs(cam, radar, intensity, gate_w, gate_b, out_w, out_b) -> None:
    b, cc, y, x = cam.shape
    cr = radar.shape[1]
    problems = []
    if radar.dim() != 4 or (radar.shape[0], radar.shape[2], radar.shape[3]) != (b, y, x):
        problems.append(f"radar {tuple(radar.shape)} vs cam {tuple(cam.shape)}")
    if tuple(intensity.shape) != (b, 1, y, x):
        problems.append(f"intensity {tuple(intensity.shape)}, expected {(b, 1, y, x)}")
    if tuple(gate_w.shape) != (1, cc + cr + 1) or tuple(gate_b.shape) != (1,):
        problems.append(f"gate_w {tuple(gate_w.shape)} / gate_b {tuple(gate_b.shape)}, expected (1, {cc + cr + 1}) / (1,)")
    if out_w.dim() != 2 or out_w.shape[1] != cc + cr or tuple(out_b.shape) != (out_w.shape[0],):
        problems.append(f"out_w {tuple(out_w.shape)} / out_b {tuple(out_b.shape)}, expected (Co, {cc + cr}) / (Co,)")
    if problems:
        raise ValueError("intensity_fusion: " + "; ".join(problems))


def _conv1x1(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w[:, :, None, None], b)


def intensity_fusion_reference(
    cam: torch.Tensor, radar: torch.Tensor, intensity: torch.Tensor,
    gate_w: torch.Tensor, gate_b: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor,
) -> torch.Tensor:
    """Plain torch, differentiable through autograd. (B, Co, Y, X)."""
    _check_inputs(cam, radar, intensity, gate_w, gate_b, out_w, out_b)
    g = torch.sigmoid(_conv1x1(torch.cat([cam, radar, intensity], 1), gate_w, gate_b))
    return _conv1x1(torch.cat([g * cam, (1 - g) * radar], 1), out_w, out_b)


# ---------------------------------------------------------------------------------------
# torch.library custom op, analytic backward
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("imkd::intensity_fusion", mutates_args=())
def _intensity_fusion_op(
    cam: torch.Tensor, radar: torch.Tensor, intensity: torch.Tensor,
    gate_w: torch.Tensor, gate_b: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor,
) -> torch.Tensor:
    return intensity_fusion_reference(cam, radar, intensity, gate_w, gate_b, out_w, out_b)


@_intensity_fusion_op.register_fake
def _intensity_fusion_fake(cam, radar, intensity, gate_w, gate_b, out_w, out_b):
    return cam.new_empty(cam.shape[0], out_w.shape[0], cam.shape[2], cam.shape[3])


def _setup_context(ctx, inputs, output):
    cam, radar, intensity, gate_w, gate_b, out_w, _ = inputs
    ctx.save_for_backward(cam, radar, intensity, gate_w, gate_b, out_w)


def _backward(ctx, grad_out):
    cam, radar, intensity, gate_w, gate_b, out_w = ctx.saved_tensors
    cc = cam.shape[1]
    # Recomputing the gate is one 1x1 conv; cheaper than keeping (B,1,Y,X) per call alive.
    x = torch.cat([cam, radar, intensity], 1)
    g = torch.sigmoid(_conv1x1(x, gate_w, gate_b))
    mixed = torch.cat([g * cam, (1 - g) * radar], 1)
    grad_mixed = torch.einsum("oc,boyx->bcyx", out_w, grad_out)
    gm_cam, gm_radar = grad_mixed[:, :cc], grad_mixed[:, cc:]
    # d out / d g = sum_c gm_cam * cam - sum_c gm_radar * radar; then through the sigmoid.
    grad_s = ((gm_cam * cam).sum(1, keepdim=True) - (gm_radar * radar).sum(1, keepdim=True)) * g * (1 - g)
    grad_x = grad_s * gate_w[0][None, :, None, None]
    grad_cam = gm_cam * g + grad_x[:, :cc]
    grad_radar = gm_radar * (1 - g) + grad_x[:, cc:-1]
    grad_intensity = grad_x[:, -1:]
    grad_gate_w = torch.einsum("byx,bcyx->c", grad_s[:, 0], x)[None]
    grad_gate_b = grad_s.sum().reshape(1)
    grad_out_w = torch.einsum("boyx,bcyx->oc", grad_out, mixed)
    grad_out_b = grad_out.sum((0, 2, 3))
    return grad_cam, grad_radar, grad_intensity, grad_gate_w, grad_gate_b, grad_out_w, grad_out_b


_intensity_fusion_op.register_autograd(_backward, setup_context=_setup_context)
fp32_under_autocast("imkd::intensity_fusion")


def intensity_fusion(
    cam: torch.Tensor, radar: torch.Tensor, intensity: torch.Tensor,
    gate_w: torch.Tensor, gate_b: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor,
) -> torch.Tensor:
    """The op the model calls (imkd::intensity_fusion): exported as one node or standard ops."""
    _check_inputs(cam, radar, intensity, gate_w, gate_b, out_w, out_b)
    return _intensity_fusion_op(cam, radar, intensity, gate_w, gate_b, out_w, out_b)


# ---------------------------------------------------------------------------------------
# nn.Module owning the parameters
# ---------------------------------------------------------------------------------------


class IntensityFusion(nn.Module):
    """Gated camera/radar fusion. ``use_intensity=False`` feeds zeros as I_R: the level-3
    ablation, with an identical parameter layout so checkpoints stay interchangeable."""

    def __init__(self, cam_ch: int, radar_ch: int, out_ch: int, use_intensity: bool = True):
        super().__init__()
        self.cam_ch, self.radar_ch, self.out_ch = cam_ch, radar_ch, out_ch
        self.use_intensity = use_intensity
        self.gate_w = nn.Parameter(torch.empty(1, cam_ch + radar_ch + 1))
        self.gate_b = nn.Parameter(torch.zeros(1))  # start at g = 0.5: trust both sensors equally
        self.out_w = nn.Parameter(torch.empty(out_ch, cam_ch + radar_ch))
        self.out_b = nn.Parameter(torch.empty(out_ch))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default init for a 1x1 conv with these fan-ins.
        bound_g = 1.0 / math.sqrt(self.gate_w.shape[1])
        bound_o = 1.0 / math.sqrt(self.out_w.shape[1])
        nn.init.uniform_(self.gate_w, -bound_g, bound_g)
        nn.init.uniform_(self.out_w, -bound_o, bound_o)
        nn.init.uniform_(self.out_b, -bound_o, bound_o)

    def forward(self, cam_bev: torch.Tensor, radar_bev: torch.Tensor, radar_intensity: torch.Tensor | None = None) -> torch.Tensor:
        if not self.use_intensity:
            radar_intensity = torch.zeros_like(cam_bev[:, :1])
        elif radar_intensity is None:
            raise ValueError("IntensityFusion(use_intensity=True) needs radar_intensity (B, 1, Y, X)")
        return intensity_fusion(cam_bev, radar_bev, radar_intensity, self.gate_w, self.gate_b, self.out_w, self.out_b)

    def extra_repr(self) -> str:
        return f"cam_ch={self.cam_ch}, radar_ch={self.radar_ch}, out_ch={self.out_ch}, use_intensity={self.use_intensity}"


# ---------------------------------------------------------------------------------------
# ONNX translations for torch.onnx.export(dynamo=True, custom_translation_table=...)
# ---------------------------------------------------------------------------------------

@script(IMKD_OPSET, default_opset=op)
def intensity_fusion_plugin(
    cam: FLOAT, radar: FLOAT, intensity: FLOAT, gate_w: FLOAT, gate_b: FLOAT, out_w: FLOAT, out_b: FLOAT,
) -> FLOAT:
    """--ops plugin: one imkd::IntensityFusion node with the TensorRT plugin attributes."""
    return IMKD_OPSET.IntensityFusion(
        cam, radar, intensity, gate_w, gate_b, out_w, out_b,
        plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
    )


@script(IMKD_OPSET, default_opset=op)
def intensity_fusion_onnx(
    cam: FLOAT, radar: FLOAT, intensity: FLOAT, gate_w: FLOAT, gate_b: FLOAT, out_w: FLOAT, out_b: FLOAT,
) -> FLOAT:
    """--ops onnx: Concat, 1x1 Conv, Sigmoid, Mul, Sub, 1x1 Conv."""
    kernel_axes = op.Constant(value_ints=[2, 3])
    gate = op.Sigmoid(op.Conv(op.Concat(cam, radar, intensity, axis=1), op.Unsqueeze(gate_w, kernel_axes), gate_b))
    one = op.CastLike(op.Constant(value_float=1.0), gate)
    mixed = op.Concat(op.Mul(gate, cam), op.Mul(op.Sub(one, gate), radar), axis=1)
    return op.Conv(mixed, op.Unsqueeze(out_w, kernel_axes), out_b)


def onnx_translations(mode: str) -> dict:
    """{torch op overload: onnxscript function} for mode "plugin", or standard ops for "onnx"
    and "tensorrt" (the lowering has no scatter, so TensorRT parses it as is)."""
    check_mode(mode)
    fn = intensity_fusion_plugin if mode == "plugin" else intensity_fusion_onnx
    return {torch.ops.imkd.intensity_fusion.default: fn}


# ---------------------------------------------------------------------------------------
# ONNX Runtime kernel (onnxruntime-extensions Python op), vectorised numpy
# ---------------------------------------------------------------------------------------


def intensity_fusion_numpy(cam, radar, intensity, gate_w, gate_b, out_w, out_b) -> np.ndarray:
    """The op in numpy: the 1x1 convs are batched matmuls over (B, C, Y*X)."""
    b, cc, y, x = cam.shape
    flat = lambda t: t.reshape(b, t.shape[1], y * x)  # noqa: E731 - local shorthand
    cam_f, radar_f = flat(cam), flat(radar)
    s = np.matmul(gate_w, np.concatenate([cam_f, radar_f, flat(intensity)], 1)) + gate_b[:, None]
    g = 1.0 / (1.0 + np.exp(-s))
    mixed = np.concatenate([g * cam_f, (1.0 - g) * radar_f], 1)
    out = np.matmul(out_w, mixed) + out_b[:, None]
    return out.reshape(b, out_w.shape[0], y, x).astype(np.float32, copy=False)


_ORT_KERNEL_REGISTERED = False


def register_ort_kernel() -> None:
    """Declare the imkd::IntensityFusion Python kernel to onnxruntime-extensions (once)."""
    global _ORT_KERNEL_REGISTERED
    if _ORT_KERNEL_REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32 = PyCustomOpDef.dt_float
    attrs = {"plugin_namespace": PyCustomOpDef.dt_string, "plugin_version": PyCustomOpDef.dt_string}

    @onnx_op(op_type="imkd::IntensityFusion", inputs=[f32] * 7, outputs=[f32], attrs=attrs)
    def _intensity_fusion_kernel(cam, radar, intensity, gate_w, gate_b, out_w, out_b, **kwargs):
        return intensity_fusion_numpy(cam, radar, intensity, gate_w, gate_b, out_w, out_b)

    _ORT_KERNEL_REGISTERED = True


# ---------------------------------------------------------------------------------------
# TensorRT plugin (IPluginV3 for imkd::IntensityFusion) -- reserved for the engines helper.
# Node contract: domain "imkd", op_type "IntensityFusion", inputs (cam f32 (B,Cc,Y,X),
# radar f32 (B,Cr,Y,X), intensity f32 (B,1,Y,X), gate_w (1,Cc+Cr+1), gate_b (1,),
# out_w (Co,Cc+Cr), out_b (Co,)), attributes plugin_namespace="imkd", plugin_version="1";
# output f32 (B, Co, Y, X).
# ---------------------------------------------------------------------------------------


def intensity_fusion_output_shape(cam_shape, radar_shape, intensity_shape, gate_w_shape, gate_b_shape,
                                  out_w_shape, out_b_shape) -> tuple:
    """(B, Co, Y, X) from the seven input shapes; plain indexing, so it also takes TensorRT shape expressions."""
    ranks = [len(s) for s in (cam_shape, radar_shape, intensity_shape, gate_w_shape, gate_b_shape, out_w_shape, out_b_shape)]
    if ranks != [4, 4, 4, 2, 1, 2, 1]:
        raise ValueError(f"imkd::IntensityFusion: input ranks must be [4, 4, 4, 2, 1, 2, 1], got {ranks}")
    return (cam_shape[0], out_w_shape[0], cam_shape[2], cam_shape[3])


def intensity_fusion_into(cam, radar, intensity, gate_w, gate_b, out_w, out_b, out: torch.Tensor) -> None:
    """The plugin's computation: overwrite `out` (TensorRT's output buffer) with the fused BEV."""
    out.copy_(intensity_fusion_reference(cam, radar, intensity, gate_w, gate_b, out_w, out_b))


def register_tensorrt_plugin(trt_module) -> str | None:
    """Define imkd::IntensityFusion for NVIDIA TensorRT >= 10.6 (tensorrt.plugin); None where unavailable."""
    from imkd_deploy.engines.plugins import define_python_plugin

    return define_python_plugin(
        trt_module, "IntensityFusion",
        inputs=("cam", "radar", "intensity", "gate_w", "gate_b", "out_w", "out_b"),
        attrs={},
        io_types=", ".join(["FP32"] * 8),
        output_shape=intensity_fusion_output_shape,
        compute=intensity_fusion_into,
    )
