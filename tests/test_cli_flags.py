"""Every subcommand's flags come from its config class: types, allowed values, defaults and help."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from neftune.choices import GenerateBackend, JudgeBackend, Server, choices_of
from neftune.cli import build_parser, commands, main
from neftune.cli_flags import settings_from_args
from neftune.cli_settings import EvalSettings, GenerateSettings, JudgeSettings
from neftune.compare_config import CompareConfig, GenerateConfig, JudgeConfig
from neftune.config import command_flags, iter_fields
from neftune.errors import ConfigError


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


@pytest.mark.parametrize("command", commands(), ids=lambda c: c.name)
def test_every_flag_of_every_command_is_a_setting_of_its_config(command):
    parser = _subparser(command.name)
    declared = {f.name for f in command_flags(command.settings)}
    assert declared, command.name
    options = {s for a in parser._actions for s in a.option_strings} | {a.dest for a in parser._actions}
    assert declared <= options
    own = {"-h", "--help", "--config", "--preset", "help", "config", "preset", "func", "takes_overrides"}
    for action in parser._actions:
        names = set(action.option_strings) or {action.dest}
        assert names & (declared | own) or action.dest.startswith("set:"), names


def test_allowed_values_come_from_the_literal_types():
    assert _action(_subparser("generate"), "--backend").choices == typing.get_args(GenerateBackend)
    assert _action(_subparser("generate"), "--server").choices == typing.get_args(Server)
    assert _action(_subparser("judge"), "--backend").choices == typing.get_args(JudgeBackend)
    assert _action(_subparser("audit"), "--format").choices == ("auto", "alpaca", "sharegpt", "messages")


def test_reused_settings_keep_the_experiments_help_and_default():
    generate = _subparser("generate")
    for flag, field in (("--max-new-tokens", "max_new_tokens"), ("--batch-size", "batch_size"), ("--url", "url")):
        source = next(f for f in dataclasses.fields(GenerateConfig) if f.name == field)
        assert _action(generate, flag).help == source.metadata["help"]
    judge_flags = {f.name: f for f in command_flags(JudgeSettings)}
    assert judge_flags["--max-tokens"].help == next(
        f.metadata["help"] for f in dataclasses.fields(JudgeConfig) if f.name == "max_tokens"
    )
    cfg = JudgeSettings()
    assert (cfg.api_key_env, cfg.temperature) == (JudgeConfig().api_key_env, JudgeConfig().temperature)
    assert GenerateSettings().answering.batch_size == GenerateConfig().batch_size


def test_flags_not_given_keep_the_configs_defaults():
    args = build_parser().parse_args(["generate", "--model", "m", "--output", "o.json"])
    assert settings_from_args(args, GenerateSettings) == GenerateSettings(model="m", output="o.json")
    args = build_parser().parse_args(["eval", "--outputs", "a.json", "--penalize-stop-tokens", "--no-progress"])
    cfg = settings_from_args(args, EvalSettings)
    assert cfg.outputs == "a.json" and not cfg.answering.spare_stop_tokens and not cfg.answering.progress
    assert cfg.eval_set == EvalSettings().eval_set and cfg.max_length == 512


def test_a_bad_choice_is_one_usage_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "m", "--output", "o.json", "--server", "tgi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("neftune: error: argument --server: invalid choice: 'tgi'") and err.count("\n") == 1


def test_only_train_and_compare_take_key_value_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--outputs", "a.json", "data.limit=3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: data.limit=3" in capsys.readouterr().err


def test_validate_checks_every_setting_with_a_closed_set_of_values():
    literal = [(key, hint) for key, _f, hint in iter_fields(CompareConfig) if choices_of(hint)]
    assert {"noise.distribution", "generate.backend", "generate.server", "judge.backend"} <= {k for k, _ in literal}
    for key, hint in literal:
        cfg = CompareConfig()
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, "bogus")
        allowed = ", ".join(choices_of(hint) or ())
        with pytest.raises(ConfigError, match=f"^{key} must be one of {allowed}; got 'bogus'$"):
            cfg.validate()
