"""Calibration caches are keyed by content: model bytes, set hash, range settings."""

from __future__ import annotations

import logging

import pytest

from imkd_deploy.calibration.cache import CalibrationCache
from imkd_deploy.calibration.calib_set import CalibEntry, CalibrationSet
from imkd_deploy.calibration.calibrate import calibrate
from imkd_deploy.calibration.quantize import QuantizeSettings


@pytest.fixture()
def setup(small_onnx, calib_feeds, tmp_path):
    entries = tuple(CalibEntry("scene-0001", f"tok{i}") for i in range(len(calib_feeds)))
    cset = CalibrationSet("v1.0-mini", "mini_train", entries)
    manifest = cset.write(tmp_path / "small_set.txt")
    calls = []

    def feeds(entry):
        calls.append(entry.sample_token)
        return calib_feeds[int(entry.sample_token[3:])]

    return manifest, feeds, calls, tmp_path / "cache"


def test_hit_then_misses_with_reasons(small_onnx, tmp_path, setup, caplog):
    manifest, feeds, calls, cache_dir = setup
    minmax = QuantizeSettings(method="minmax")
    first = calibrate(small_onnx, manifest, "int8", tmp_path / "a.onnx", feeds, minmax, cache_dir)
    assert first.cache_note.startswith("miss") and len(calls) == 8
    assert any(">= 100" in w for w in first.warnings)                   # 8 frames is too few

    calls.clear()
    second = calibrate(small_onnx, manifest, "int8", tmp_path / "b.onnx", feeds, minmax, cache_dir)
    assert second.cache_note == "hit" and calls == []                   # no frame read on a hit
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()

    with caplog.at_level(logging.WARNING, logger="imkd.calibration"):
        third = calibrate(small_onnx, manifest, "int8", tmp_path / "c.onnx", feeds,
                          QuantizeSettings(method="percentile"), cache_dir)
    assert "setting method: 'minmax' -> 'percentile'" in third.cache_note
    assert "calibration cache miss" in caplog.text

    cset = CalibrationSet("v1.0-mini", "mini_train", tuple(CalibEntry("scene-0001", f"tok{i}") for i in range(4)))
    cset.write(manifest)                                                # same name, other frames
    fourth = calibrate(small_onnx, manifest, "int8", tmp_path / "d.onnx", feeds, minmax, cache_dir)
    assert "calibration set changed" in fourth.cache_note


def test_model_change_misses(tmp_path, setup, calib_feeds):
    from small_net import export_small_net

    manifest, feeds, calls, cache_dir = setup
    model = export_small_net(tmp_path / "m.onnx", seed=0)
    calibrate(model, manifest, "int8", tmp_path / "a.onnx", feeds, QuantizeSettings(method="minmax"), cache_dir)
    export_small_net(model, seed=1)                                     # retrained weights, same path
    res = calibrate(model, manifest, "int8", tmp_path / "b.onnx", feeds, QuantizeSettings(method="minmax"), cache_dir)
    assert "model changed" in res.cache_note


def test_corrupt_cache_is_not_used(small_onnx, tmp_path, setup):
    manifest, feeds, calls, cache_dir = setup
    calibrate(small_onnx, manifest, "int8", tmp_path / "a.onnx", feeds, QuantizeSettings(method="minmax"), cache_dir)
    (entry,) = list(cache_dir.glob("*.json"))
    entry.write_text(entry.read_text()[:50])
    calls.clear()
    res = calibrate(small_onnx, manifest, "int8", tmp_path / "b.onnx", feeds, QuantizeSettings(method="minmax"), cache_dir)
    assert "unusable" in res.cache_note and len(calls) == 8
    assert CalibrationCache(cache_dir).root == cache_dir
