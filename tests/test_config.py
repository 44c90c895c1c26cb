"""The config tree: YAML, overrides, flags, validation, redaction, shipped config files."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from neftune.cli import main
from neftune.compare_config import CompareConfig
from neftune.config import (
    Config,
    apply_overrides,
    command_flags,
    from_dict,
    iter_fields,
    load_config,
    setting,
    to_dict,
    write_config,
)
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
    from neftune.config_io import _redact

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


def test_no_judge_unless_one_is_configured():
    assert load_config(CompareConfig).judge.backend == "none"
    for backend in ("local", "http", "length", "none"):
        extra = ["judge.base_url=http://127.0.0.1:1/v1", "judge.model=m"] if backend == "http" else []
        assert load_config(CompareConfig, None, [f"judge.backend={backend}", *extra]).judge.backend == backend
    with pytest.raises(ConfigError, match=r"judge\.backend must be one of none, local, http, length"):
        load_config(CompareConfig, None, ["judge.backend=gpt"])


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


TRAIN_FLAGS = "--model --data --eval-data --format --output --alpha --epochs --max-steps --lr --batch-size"
TRAIN_FLAGS += (
    " --max-length --seed --on-bad-record --lora --full --merge --packing --no-packing --resume --no-progress"
)
COMPARE_FLAGS = "--model --data --eval-data --eval-limit --format --output --alphas --seeds --max-steps --epochs --lr"
COMPARE_FLAGS += " --batch-size --max-length --max-new-tokens --judge --judge-model --judge-url --on-bad-record"
COMPARE_FLAGS += " --lora --full --packing --no-packing --no-progress"


@pytest.mark.parametrize(
    ("command", "cls", "expected"), [("train", Config, TRAIN_FLAGS), ("compare", CompareConfig, COMPARE_FLAGS)]
)
def test_cli_help_lists_every_flag_and_every_setting(capsys, command, cls, expected):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options, settings = out.split("all settings (YAML sections or key=value):")
    declared = {f.name for f in command_flags(cls)}
    assert set(expected.split()) <= declared  # every flag the command has always had is still generated
    for name in declared:
        assert re.search(rf"^  {re.escape(name)}\b", options, re.M), name
    for key, f, _hint in iter_fields(cls):
        assert re.search(rf"^  {re.escape(key)} ", settings, re.M), key
        assert " ".join(f.metadata["help"].split())[:30] in " ".join(settings.split())
    # a flag's help is its setting's help, written once in config.py
    lr = next(f for f in command_flags(cls) if f.name == "--lr")
    assert lr.key == "train.lr" and "peak learning rate" in lr.help and "peak learning rate" in options


def _parsed(argv: list[str]):
    from neftune.cli import build_parser, config_from_args

    args, extra = build_parser().parse_known_args(argv)
    args.overrides = extra
    return config_from_args(args, CompareConfig if argv[0] == "compare" else Config)


def test_flags_set_their_settings_and_lists_take_one_value():
    cfg = _parsed(["compare", "--alphas", "5", "--seeds", "3", "--output", "exp", "--full", "--no-progress"])
    assert cfg.compare.alphas == [5.0] and cfg.compare.seeds == [3]
    assert cfg.compare.output == "exp" and cfg.train.output == "runs/train"  # compare's --output is its own
    assert cfg.model.lora is False and cfg.train.progress is False
    cfg = _parsed(["compare", "--alphas", "5,10.5", "--seeds", "[0, 1]", "--judge", "length"])
    assert cfg.compare.alphas == [5.0, 10.5] and cfg.compare.seeds == [0, 1] and cfg.judge.backend == "length"
    cfg = _parsed(["train", "--output", "run", "--alpha", "10", "--lora", "--no-packing", "--epochs", "2"])
    assert (cfg.train.output, cfg.noise.alpha, cfg.model.lora, cfg.data.packing) == ("run", 10.0, True, False)
    assert cfg.train.epochs == 2.0
    assert load_config(CompareConfig, None, ["compare.alphas=7"]).compare.alphas == [7.0]


def test_compare_has_no_flags_for_the_settings_it_sets_per_arm(capsys):
    names = {f.name for f in command_flags(CompareConfig)}
    assert not names & {"--alpha", "--seed", "--resume"}
    # not an abbreviation of --alphas either: a mistyped flag is an error, never another setting
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--alpha", "5"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --alpha 5" in capsys.readouterr().err


@dataclass
class _A:
    x: int = setting(1, "x", flag="--n")


@dataclass
class _B:
    y: int = setting(2, "y", flag="--n")


@dataclass
class _Both:
    a: _A = field(default_factory=_A)
    b: _B = field(default_factory=_B)


def test_two_settings_cannot_claim_one_flag():
    with pytest.raises(ValueError, match=r"flag --n is claimed by both a\.x and b\.y"):
        command_flags(_Both)


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip().startswith("neftune ")
