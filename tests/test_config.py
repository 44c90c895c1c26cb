"""The config tree: YAML, overrides, flags, validation, redaction, shipped config files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neftune.cli import main
from neftune.config import CompareConfig, Config, apply_overrides, from_dict, load_config, to_dict, write_config
from neftune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_embedded():
    cfg = load_config(Config)
    assert cfg.model.name == "smollm2-135m" and cfg.data.train == "builtin:skills"
    assert cfg.noise.alpha == 5.0 and cfg.data.packing is True


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("noise:\n  alpha: 10\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(Config, path, ["train.lr=3e-5", "data.packing=false", "model.lora_targets=q_proj,v_proj"])
    assert cfg.noise.alpha == 10.0 and cfg.train.lr == 3e-5
    assert cfg.data.packing is False and cfg.model.lora_targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("noise.alpha=-1", "noise.alpha must be a finite number >= 0"),
        ("noise.alpha=abc", "noise.alpha must be a number"),
        ("noise.alpha=.nan", "noise.alpha must be a finite number"),
        ("train.batch_size=0", "train.batch_size must be a positive integer"),
        ("data.packing=maybe", "data.packing must be true or false"),
        ("data.on_bad_record=ignore", "data.on_bad_record must be one of error, skip"),
        ("train.nope=1", "unknown setting train.nope"),
        ("noise=3", "noise must be a mapping"),
        ("justakey", "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(Config, None, [override])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1e-4\n  batch_size: [8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(Config, path)


def test_secrets_are_redacted_but_env_var_names_are_kept(tmp_path):
    cfg = from_dict(CompareConfig, {"judge": {"backend": "http", "base_url": "http://x", "model": "m"}})
    data = to_dict(cfg)
    assert data["judge"]["api_key_env"] == "OPENAI_API_KEY"
    apply_overrides(raw := {}, ["judge.api_key=sk-secret"])
    assert raw == {"judge": {"api_key": "sk-secret"}}
    from neftune.config import _redact

    assert _redact({"api_key": "sk-secret", "hf_token": "hf_x", "name": "ok"}) == {
        "api_key": "***",
        "hf_token": "***",
        "name": "ok",
    }
    write_config(cfg, tmp_path / "c.yaml")
    assert "sk-" not in (tmp_path / "c.yaml").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cls = CompareConfig if "compare" in yaml.safe_load(path.read_text()) else Config
    load_config(cls, path)


def test_compare_validation():
    with pytest.raises(ConfigError, match=r"compare\.alphas must be finite numbers > 0"):
        load_config(CompareConfig, None, ["compare.alphas=[0, 5]"])
    with pytest.raises(ConfigError, match=r"judge\.backend=http needs"):
        load_config(CompareConfig, None, ["judge.backend=http"])
    cfg = load_config(CompareConfig, None, ["compare.alphas=5,15", "compare.seeds=[0, 1]"])
    assert cfg.compare.alphas == [5.0, 15.0] and cfg.compare.seeds == [0, 1]


def test_cli_flag_errors_are_one_line(capsys):
    assert main(["train", "--alpha", "nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "neftune: error: noise.alpha must be a finite number >= 0, got nan"


def test_cli_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("model.lora_r", "data.packing", "noise.distribution", "train.save_steps"):
        assert key in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip().startswith("neftune ")
