"""Config validation: every bad value stops with one line naming key, value and what is allowed."""

import pytest
import yaml

from dpgen.config import ConfigError, config_from_dict, load_config
from dpgen.cli import main

REPO_CONFIGS = ["configs/quickstart.yaml", "configs/breast_eps10.yaml"]


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_shipped_configs_validate(path):
    from tests.conftest import REPO

    cfg = load_config(REPO / path)
    assert cfg.privacy.epsilon > 0 and 0 < cfg.privacy.delta < 1


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("privacy.epsilon", 0, "privacy.epsilon = 0: must be > 0"),
        ("privacy.epsilon", -1.5, "privacy.epsilon = -1.5"),
        ("privacy.delta", 1.0, "privacy.delta = 1.0: must be in the open interval (0, 1)"),
        ("privacy.delta", 0, "privacy.delta = 0"),
        ("finetune.batch_size", -4, "finetune.batch_size = -4: Input should be greater than 0"),
        ("sample.num_images", 0, "sample.num_images = 0"),
        ("pretrain.steps", -1, "pretrain.steps = -1"),
        ("finetune.lr", "fast", "finetune.lr = 'fast'"),
    ],
)
def test_bad_values_name_key_and_value(tiny_raw, key, value, expect):
    from dpgen.config import apply_overrides

    raw = apply_overrides(tiny_raw, [f"{key}={value}"])
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    msg = str(err.value)
    assert expect in msg
    assert len(msg.splitlines()) == 1


def test_unknown_key_is_an_error(tiny_raw):
    tiny_raw["finetune"]["stepz"] = 10
    with pytest.raises(ConfigError, match=r"finetune.stepz = 10: unknown key in finetune"):
        config_from_dict(tiny_raw)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values(tmp_path, tiny_raw):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    cfg = load_config(p, ["privacy.epsilon=3", "finetune.noise_multiplicity=4", "privacy.epsilon=.inf"])
    assert cfg.privacy.epsilon == float("inf") and cfg.finetune.noise_multiplicity == 4


def test_config_round_trips(tiny_config):
    assert config_from_dict(tiny_config.to_dict()) == tiny_config


def test_cli_missing_data_file_names_the_key(tmp_path, tiny_raw, capsys):
    tiny_raw["data"]["private"]["source"] = str(tmp_path / "missing.npz")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    assert main(["run", str(p), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.private.source" in err and "missing.npz" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_cli_bad_override_is_one_line(tmp_path, tiny_raw, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    assert main(["run", str(p), "privacy.delta=2", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dpgen: error: config error: privacy.delta = 2: must be in the open interval (0, 1)"]
