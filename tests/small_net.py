"""A small conv net exported once per session (dynamo exporter, dynamic batch), and its INT8
Q/DQ copy: the toy models the calibration and engine tests share."""

from __future__ import annotations

import numpy as np
import pytest
import torch


class SmallNet(torch.nn.Module):
    """Backbone of conv+BN+ReLU, an upsample, and a `head` scope that must stay FP32."""

    def __init__(self):
        super().__init__()
        layers = []
        for cin, cout in ((3, 16), (16, 16), (16, 32)):
            layers += [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]
        self.backbone = torch.nn.Sequential(*layers)
        self.head = torch.nn.Conv2d(32, 4, 1)

    def forward(self, img):
        feat = torch.nn.functional.interpolate(self.backbone(img), scale_factor=2.0, mode="bilinear")
        logits = self.head(feat)
        return torch.sigmoid(logits), logits.mean((2, 3))


def export_small_net(path, seed: int = 0):
    torch.manual_seed(seed)
    net = SmallNet().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    batch = torch.export.Dim("batch", min=1, max=8)
    torch.onnx.export(net, (torch.randn(2, 3, 32, 32),), str(path), dynamo=True, input_names=["img"],
                      output_names=["heat", "pool"], dynamic_shapes={"img": {0: batch}}, verbose=False)
    return path


@pytest.fixture(scope="session")
def small_onnx(tmp_path_factory):
    torch.set_num_threads(1)
    return export_small_net(tmp_path_factory.mktemp("models") / "small.onnx")


@pytest.fixture(scope="session")
def calib_feeds():
    rng = np.random.default_rng(0)
    return [{"img": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(8)]


@pytest.fixture(scope="session")
def int8_onnx(small_onnx, calib_feeds, tmp_path_factory):
    from imkd_deploy.calibration.quantize import QuantizeSettings, quantize_int8

    out = tmp_path_factory.mktemp("int8") / "small.int8.onnx"
    quantize_int8(small_onnx, calib_feeds, out, QuantizeSettings(method="minmax"), set_sha256="ab" * 32)
    return out
