import pytest
import yaml

from ser_hpc.config import ConfigError, load_config, parse_override, valid_keys


def _base(tmp_path, **extra):
    tree = {"data": {"train_csv": "t.csv", "audio_dir": "a"},
            "model": {"speech": {"name": "s"}, "text": {"name": "t"}}}
    tree.update(extra)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_yaml_then_overrides_with_types(tmp_path):
    cfg = load_config([_base(tmp_path)], ["train.lr=1e-4", "train.batch_size=8", "model.hidden_layers=3",
                                          "train.bf16=true", "data.speeds=[0.8, 1.2]", "run.name=my run; x"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 8 and cfg.model.hidden_layers == 3 and cfg.train.bf16 is True
    assert cfg.data.speeds == [0.8, 1.2] and cfg.run.name == "my run; x"
    # YAML 1.1 reads 5e-5 without a dot as a string; float keys still accept it.
    assert load_config([_base(tmp_path)], ["train.lr=5e-5"]).train.lr == pytest.approx(5e-5)


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config([_base(tmp_path)], ["train.learning_rate=1"])
    msg = str(err.value)
    assert "train.learning_rate" in msg and "train.lr" in msg and "Valid keys" in msg
    for key in valid_keys():
        assert key in msg


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = _base(tmp_path, train={"lr": 1e-3, "batchsize": 4})
    with pytest.raises(ConfigError, match=r"train\.batchsize.*run\.yaml"):
        load_config([path])


def test_wrong_type_and_bad_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size.*must be int.*'big'"):
        load_config([_base(tmp_path)], ["train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"train\.bf16.*must be bool"):
        load_config([_base(tmp_path)], ["train.bf16=3"])
    with pytest.raises(ConfigError, match=r"model\.modalities.*one of audio\+text, audio, text, got 'video'"):
        load_config([_base(tmp_path)], ["model.modalities=video"])
    with pytest.raises(ConfigError, match=r"'inverse_normalized' was removed.*use 'inverse'"):
        load_config([_base(tmp_path)], ["train.class_weights=inverse_normalized"])
    with pytest.raises(ConfigError, match=r"data\.augment_prob"):
        load_config([_base(tmp_path)], ["data.augment_prob=1.5"])


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([_base(tmp_path)], ["train.lr=0.001"])
    again = load_config(overrides=[], base=yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
