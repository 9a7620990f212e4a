from __future__ import annotations

import numpy as np

from imkd_deploy.calibration.quantize import QuantizeSettings, get_ranges
from imkd_deploy.calibration.sensitivity import sensitivity_pass


def test_sensitivity_excludes_worst_layers_until_target(small_onnx, calib_feeds, tmp_path):
    settings = QuantizeSettings(method="minmax")
    ranges, _ = get_ranges(small_onnx, calib_feeds[:4], settings)
    # Loose target: met with every eligible layer in INT8.
    loose = sensitivity_pass(small_onnx, ranges, calib_feeds[4:6], tmp_path / "loose.onnx", settings, target=0.05)
    assert loose.met and loose.excluded == []
    # A target below what any int8 layer achieves forces layers out, worst first.
    start = max(loose.initial_error.values())
    tight = sensitivity_pass(small_onnx, ranges, calib_feeds[4:6], tmp_path / "tight.onnx", settings,
                             target=start / 3, max_fp32_layers=3)
    assert len(tight.layer_error) == 3 and tight.excluded
    ranked = sorted(tight.layer_error, key=tight.layer_error.get, reverse=True)
    assert tight.excluded == ranked[: len(tight.excluded)]
    assert max(tight.final_error.values()) < start
    assert tight.met == (max(tight.final_error.values()) <= start / 3)
    # excluding every layer gives the FP32 model back: error 0, target met
    assert np.isfinite(list(tight.final_error.values())).all()
    everything = sensitivity_pass(small_onnx, ranges, calib_feeds[4:6], tmp_path / "all.onnx", settings,
                                  target=1e-9, max_fp32_layers=3)
    assert everything.met and max(everything.final_error.values()) == 0.0
