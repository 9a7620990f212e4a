"""IntensityFusion: reference == custom op == module == numpy kernel, and exact gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imkd_deploy.ops.intensity_fusion import (
    IntensityFusion,
    intensity_fusion,
    intensity_fusion_numpy,
    intensity_fusion_reference,
)


def _inputs(b=2, cc=4, cr=3, co=5, y=6, x=7, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return (r(b, cc, y, x), r(b, cr, y, x), torch.rand(b, 1, y, x, generator=gen, dtype=dtype),
            r(1, cc + cr + 1), r(1), r(co, cc + cr), r(co))


def _by_hand(cam, radar, inten, gw, gb, ow, ob):
    """The formula written out per cell with float64 numpy."""
    cam, radar, inten, gw, gb, ow, ob = (t.double().numpy() for t in (cam, radar, inten, gw, gb, ow, ob))
    x = np.concatenate([cam, radar, inten], 1)                       # (B, Cin, Y, X)
    g = 1 / (1 + np.exp(-(np.einsum("c,bcyx->byx", gw[0], x) + gb[0])))[:, None]
    mixed = np.concatenate([g * cam, (1 - g) * radar], 1)
    return np.einsum("oc,bcyx->boyx", ow, mixed) + ob[None, :, None, None]


def test_reference_custom_op_numpy_agree_with_formula():
    args = _inputs()
    expected = _by_hand(*args)
    ref = intensity_fusion_reference(*args)
    op = intensity_fusion(*args)
    npk = intensity_fusion_numpy(*(a.numpy() for a in args))
    assert ref.shape == (2, 5, 6, 7) and npk.dtype == np.float32
    for out in (ref.numpy(), op.numpy(), npk):
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_module_uses_its_parameters_and_ablation_feeds_zero_intensity():
    cam, radar, inten, *_ = _inputs(cc=4, cr=3)
    mod = IntensityFusion(4, 3, 5)
    with torch.no_grad():
        mod.gate_b.fill_(0.3)
    out = mod(cam, radar, inten)
    torch.testing.assert_close(out, intensity_fusion_reference(cam, radar, inten, mod.gate_w, mod.gate_b, mod.out_w, mod.out_b))
    ablated = IntensityFusion(4, 3, 5, use_intensity=False)
    ablated.load_state_dict(mod.state_dict())  # same parameter layout either way
    expected = mod(cam, radar, torch.zeros_like(inten))
    torch.testing.assert_close(ablated(cam, radar, inten), expected)
    torch.testing.assert_close(ablated(cam, radar), expected)
    assert not torch.allclose(out, expected)  # the intensity prior does change the output
    with pytest.raises(ValueError, match="radar_intensity"):
        mod(cam, radar)


def test_shape_errors_name_the_tensor():
    cam, radar, inten, gw, gb, ow, ob = _inputs()
    with pytest.raises(ValueError, match="gate_w"):
        intensity_fusion(cam, radar, inten, gw[:, :-1], gb, ow, ob)
    with pytest.raises(ValueError, match="intensity"):
        intensity_fusion(cam, radar, inten[:, :, :-1], gw, gb, ow, ob)


def test_custom_op_gradcheck_all_inputs():
    args = tuple(a.requires_grad_() for a in _inputs(b=2, cc=2, cr=2, co=3, y=3, x=2, dtype=torch.float64))
    assert torch.autograd.gradcheck(intensity_fusion, args)
    # the analytic backward agrees with autograd through the reference at fp32 sizes too
    args32 = tuple(a.requires_grad_() for a in _inputs(seed=3))
    grad_out = torch.randn(2, 5, 6, 7)
    g_op = torch.autograd.grad(intensity_fusion(*args32), args32, grad_out)
    g_ref = torch.autograd.grad(intensity_fusion_reference(*args32), args32, grad_out)
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert a.abs().sum() > 0


def test_under_autocast_the_op_runs_in_fp32_and_backpropagates(in_own_process):
    """AMP hands the op bf16 features beside fp32 parameters: it must run (in fp32) and give each
    input a gradient of that input's dtype, equal to the fp32 op's on the same values."""
    if not in_own_process:
        return
    cam, radar, inten, *params = _inputs()
    cam16, radar16 = cam.bfloat16().requires_grad_(), radar.bfloat16().requires_grad_()
    params = [p.clone().requires_grad_() for p in params]
    w = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = intensity_fusion(cam16, radar16, inten, *params)
    assert out.dtype == torch.float32
    (out * w).sum().backward()
    assert cam16.grad.dtype == radar16.grad.dtype == torch.bfloat16

    ref_in = [cam16.detach().float().requires_grad_(), radar16.detach().float().requires_grad_()]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = intensity_fusion_reference(*ref_in, inten, *ref_params)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for got, want in zip(params, ref_params):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cam16.grad, ref_in[0].grad.bfloat16())


@pytest.mark.gpu
def test_on_cuda_matches_the_cpu_reference():
    """The op on CUDA tensors, as the TensorRT plugin's enqueue runs it. cuDNN runs FP32
    convolutions in TF32 on Ampere and later (measured on an H100: max abs error 1.2e-2 here),
    so the FP32 comparison turns TF32 off for its duration."""
    from imkd_deploy.ops.intensity_fusion import intensity_fusion_into

    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 32, 64, 64, generator=g), torch.randn(1, 32, 64, 64, generator=g),
            torch.rand(1, 1, 64, 64, generator=g), torch.randn(1, 65, generator=g), torch.randn(1, generator=g),
            torch.randn(64, 64, generator=g), torch.randn(64, generator=g))
    out = torch.empty(1, 64, 64, 64, device="cuda")
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        intensity_fusion_into(*(a.cuda() for a in args), out)
    finally:
        torch.backends.cudnn.allow_tf32 = before
    torch.testing.assert_close(out.cpu(), intensity_fusion_reference(*args), atol=1e-4, rtol=1e-4)
