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


def test_settings_of_levels_left_off_are_named(tmp_path):
    from typer.testing import CliRunner

    from imkd_deploy.cli import app
    from imkd_deploy.config import DistillConfig

    d = DistillConfig(levels="radar", w_resp_reg=1.0, resp_gate=True, lambda_off=0.0, kd_until=0.5)
    assert d.idle_settings() == {"w_resp_reg": 1.0, "resp_gate": True}      # level 1 reads lambda_off and kd_until
    assert DistillConfig(levels="all", w_resp_reg=1.0, resp_gate=True).idle_settings() == {}
    assert DistillConfig(levels="none").idle_settings() == {}               # defaults are never named
    # imkd train warns before it trains (here it then fails on the missing drive)
    cfg = tmp_path / "run.json"
    cfg.write_text(RunConfig(distill=d).to_json())
    result = CliRunner().invoke(app, ["train", "student", "--config", str(cfg), "--dataroot", str(tmp_path / "nowhere"),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "distill.w_resp_reg=1.0 acts on level(s) resp, which distill 'radar' leaves off" in text
    assert "distill.resp_gate=True" in text and "lambda_off" not in text
