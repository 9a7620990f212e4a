import json

import pytest

from imkd_deploy.config import ConfigError, ModelConfig, RunConfig, load_model_config, nuscenes_r50, tiny


def test_presets_round_trip_through_json():
    for cfg in (tiny(), nuscenes_r50()):
        again = ModelConfig.from_json(cfg.to_json())
        assert again == cfg


def test_nuscenes_reference_sizes():
    cfg = nuscenes_r50()
    assert (cfg.grid.nx, cfg.grid.ny) == (128, 128)
    assert cfg.feature_size == (16, 44)
    assert cfg.num_depth_bins == 118
    assert cfg.context_channels == 80


def test_unknown_field_suggests_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'image_size'"):
        ModelConfig.from_dict({"image_sise": [64, 64]})


def test_wrong_type_rejected():
    with pytest.raises(ConfigError, match="expected int"):
        ModelConfig.from_dict({"num_cams": "six"})
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig.from_dict({"image_size": [100, 256]})


def test_run_config_nested_and_file(tmp_path):
    run = RunConfig()
    run2 = RunConfig.from_dict(json.loads(run.to_json()))
    assert run2 == run
    path = tmp_path / "cfg.json"
    path.write_text(run.to_json())
    assert load_model_config(path) == run.model
    with pytest.raises(ConfigError, match="Did you mean 'tiny'"):
        load_model_config("tinny")


def test_distill_levels():
    from imkd_deploy.config import DistillConfig

    assert DistillConfig(levels="all").enabled("radar")
    assert not DistillConfig(levels="none").enabled("fused")
    assert DistillConfig.from_dict({"levels": "radar"}).enabled("radar")
    with pytest.raises(ConfigError):
        DistillConfig.from_dict({"levels": "lidar"})
