"""Shared fixtures (tiny in-process models and tokenizers, never a download) and the test tiers.

Tiers (docs/testing.md): ``make test-fast`` deselects ``e2e`` and ``slow``; ``make test`` runs everything.
A test is ``e2e`` when its body starts a process (the CLI or Python in a subprocess, a launcher, a
server, a browser) or trains through ``neftune.cli.main`` (``train`` / ``compare``).  The marker is
given here, deterministically, from :data:`E2E` and from the ``server`` / ``vllm`` markers; the
autouse guard :func:`_e2e_guard` then fails any test that does either of those things without it, so
the table cannot fall behind the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import ALPACA, MESSAGES, SECRET

from neftune.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny

# -- tiers ---------------------------------------------------------------------------------------

E2E: dict[str, set[str]] = {
    "test_bad_inputs.py": {
        "test_a_fresh_process_prints_one_line_and_no_traceback",
        # the cases of test_bad_input that train through the CLI
        "test_bad_input[truncated_json_array_keeps_complete_records]",
        "test_bad_input[bom_jsonl_loads]",
        "test_bad_input[bom_json_array_loads]",
        "test_bad_input[dpo_bad_pairs_skipped_and_counted]",
        "test_bad_input[some_examples_all_prompt_after_truncation]",
        "test_bad_input[skip_bad_records_and_count_them]",
    },
    "test_compare.py": {
        "test_compare_end_to_end_resumes_and_never_writes_the_key",
        "test_compare_holds_out_part_of_a_custom_training_set_it_cannot_spare",
        "test_compare_rerun_with_other_settings_errors_retrains_or_regenerates",
        "test_compare_preset_recipes",
        "test_compare_answers_a_separate_prompt_set_and_measures_loss_on_the_heldout_data",
        "test_compare_two_seeds_pairs_within_seed_pools_and_measures_the_aa_floor",
    },
    "test_data_pipeline.py": {"test_compare_holds_out_a_tenth_of_a_training_file_and_never_trains_on_it"},
    "test_distributed.py": {
        "test_each_rank_draws_its_own_per_example_noise",
        "test_weights_match_a_single_process_with_the_same_global_batch",
        "test_saved_models_reload_in_a_fresh_process",
        "test_one_done_line_per_run_counting_every_ranks_tokens",
    },
    "test_distributed_dpo.py": {"test_dpo_under_ddp_noises_each_ranks_policy_per_example_and_never_the_reference"},
    "test_docs.py": {"test_mkdocs_build_strict"},
    "test_imports.py": {"test_every_module_imports_alone", "test_an_import_cycle_is_caught"},
    "test_judge_http.py": {
        "test_a_server_killed_mid_judging_stops_the_run_and_the_rerun_asks_only_the_unanswered",
        "test_compare_stops_with_one_line_when_its_judge_server_is_gone",
    },
    "test_patch.py": {
        "test_bootstrap_waits_for_transformers_and_runs_the_sitecustomize_it_shadows",
        "test_run_forwards_signals_and_the_exit_status",
        "test_trl_sft_cli_through_neftune_run_gets_per_example_noise",
    },
    "test_preempt.py": {
        "test_a_signal_before_the_first_step_stops_with_nothing_new_to_save",
        "test_compare_stops_with_the_checkpoint_and_a_rerun_continues",
        "test_sigterm_from_outside_exits_75_naming_the_checkpoint_and_resume_is_exact",
        "test_a_second_signal_stops_at_once_without_a_checkpoint",
        "test_a_signal_to_one_rank_checkpoints_every_rank_and_resume_is_exact",
    },
    "test_preference.py": {"test_cli_full_finetuning_dpo_on_generated_pairs_saves_full_weights"},
    "test_preference_noise.py": {"test_trl_dpo_cli_with_peft_through_neftune_run_never_noises_the_reference"},
    "test_reliability.py": {
        "test_sigkill_then_resume_matches_the_uninterrupted_run",
        "test_no_hook_remains_after_an_exception_inside_compare_evaluation",
        "test_compare_killed_mid_arm_resumes_without_retraining_finished_arms",
    },
    "test_resources.py": {
        "test_a_full_disk_during_a_checkpoint_names_the_disk_and_resume_uses_the_last_complete_one",
        "test_host_out_of_memory_names_the_settings_to_lower_with_their_values",
        "test_out_of_memory_while_compare_answers_names_the_generation_settings",
        "test_another_file_system_error_while_checkpointing_is_one_line_with_the_resume_point",
    },
    "test_report.py": {"test_report_renders_in_headless_chromium"},
    "test_serve.py": {"test_compare_answers_every_arm_through_the_server_under_its_own_name"},
    "test_train.py": {
        "test_saved_models_load_with_plain_transformers_in_a_fresh_process",
        "test_full_disk_while_saving_the_final_model",
        "test_two_cpu_processes_with_torchrun",
    },
    "test_vllm_server.py": {
        "test_generate_serves_a_full_model_whole",
        "test_compare_serves_every_lora_arm_from_one_engine_and_stops_it",
        "test_a_server_that_exits_or_never_answers_is_one_line",
        "test_its_own_server_is_asked_for_the_penalty_that_spares_the_stop_tokens",
    },
}
"""Per test module, the tests that are ``e2e`` (besides every ``server`` and ``vllm`` test): a function
name for all its cases, ``name[id]`` for one case."""

# Programs a test (or a library under it) may start without being e2e: plumbing that takes
# milliseconds (tmpfs mounts in test_resources, platform/ctypes probes inside libraries).
PLUMBING = frozenset({"mount", "umount", "uname", "ldconfig", "ldconfig.real", "gcc", "cc", "ld", "git", "nvidia-smi"})


def pytest_collection_modifyitems(config, items):
    modules: dict[str, object] = {}
    for item in items:
        module = item.module.__name__.rpartition(".")[2] + ".py" if getattr(item, "module", None) else ""
        if module in E2E:
            modules[module] = item.module
        listed = E2E.get(module, ())
        if (
            getattr(item, "originalname", item.name) in listed
            or item.name in listed
            or item.get_closest_marker("server")
            or item.get_closest_marker("vllm")
        ):
            item.add_marker(pytest.mark.e2e)
    stale = [
        f"{m}::{name}"
        for m, module in modules.items()
        for name in sorted(E2E[m])
        if not hasattr(module, name.partition("[")[0])
    ]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py E2E names tests that do not exist: {', '.join(stale)}")


class _Activity:
    """What the running test started: programs (argv[0]) and CLI-driven training runs."""

    def __init__(self) -> None:
        self.active = False
        self.programs: list[str] = []
        self.cli_trainings = 0


_activity = _Activity()
_real_popen_init = subprocess.Popen.__init__


def _recording_popen_init(self, args, *rest, **kwargs):
    if _activity.active:
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        program = str(kwargs.get("executable") or argv[0])
        if kwargs.get("shell"):
            program = program.split()[0] if program.split() else program
        if Path(program).name not in PLUMBING:
            _activity.programs.append(program)
    return _real_popen_init(self, args, *rest, **kwargs)


def _watch_cli_training() -> None:
    """Count training runs (``CallbackHandler.on_train_begin``, which every ``Trainer.train`` calls)
    started under ``neftune.cli.main``, once transformers' Trainer is loaded.  ``Trainer.train`` itself
    is left alone: ``neftune.patch`` reads its source."""
    callbacks = sys.modules.get("transformers.trainer_callback")
    if callbacks is None or getattr(callbacks.CallbackHandler.on_train_begin, "_neftune_watched", False):
        return
    from neftune import cli

    real_on_train_begin = callbacks.CallbackHandler.on_train_begin
    cli_code = cli.main.__code__

    def on_train_begin(self, *args, **kwargs):
        if _activity.active:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code is not cli_code:
                frame = frame.f_back
            _activity.cli_trainings += frame is not None
        return real_on_train_begin(self, *args, **kwargs)

    on_train_begin._neftune_watched = True  # type: ignore[attr-defined]
    callbacks.CallbackHandler.on_train_begin = on_train_begin


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Watch the test's body (not its fixtures: a session fixture is set up by whichever test asks first)."""
    _watch_cli_training()
    _activity.programs.clear()
    _activity.cli_trainings = 0
    _activity.active = subprocess.Popen.__init__ is _recording_popen_init
    try:
        result = yield
    finally:
        _activity.active = False
    if item.get_closest_marker("e2e") is None and (_activity.programs or _activity.cli_trainings):
        started = ", ".join(sorted(set(_activity.programs))) or "-"
        pytest.fail(
            f"{item.nodeid} is not marked e2e but started processes ({started}) or trained through "
            f"neftune.cli.main ({_activity.cli_trainings} run(s)): add it to E2E in tests/conftest.py",
            pytrace=False,
        )
    return result


def pytest_sessionstart(session):
    subprocess.Popen.__init__ = _recording_popen_init  # type: ignore[method-assign]


def pytest_sessionfinish(session):
    subprocess.Popen.__init__ = _real_popen_init  # type: ignore[method-assign]


# -- shared fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_model(vocab_size=len(tiny_tokenizer), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random model + tokenizer directory (loadable with from_pretrained)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def neftune_cache(tmp_path_factory) -> Path:
    """The one neftune cache of the session (one per xdist worker), with ``tiny-random`` already built.

    Tests that need ``NEFTUNE_CACHE`` set it to this; tests of the cache itself use their own.
    """
    from neftune.models import resolve_model

    root = tmp_path_factory.getbasetemp() / "neftune-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEFTUNE_CACHE", str(root))
        resolve_model("tiny-random")  # built once, before any test (or a launched rank) needs it
    return root


def _train_once(cache: Path, argv: list[str]) -> str:
    """``neftune train ARGV`` in-process with the shared cache; returns its stdout."""
    from neftune.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEFTUNE_CACHE", str(cache))
        mp.setenv("OPENAI_API_KEY", SECRET)
        stdout, stderr = io.StringIO(), io.StringIO()
        mp.setattr(sys, "stdout", stdout)
        mp.setattr(sys, "stderr", stderr)
        rc = main(["train", *argv])
    assert rc == 0, stderr.getvalue()
    return stdout.getvalue()


@pytest.fixture(scope="session")
def shared_train_data(tmp_path_factory) -> Path:
    """alpaca.json / messages.jsonl of :data:`ALPACA` and :data:`MESSAGES` for the shared runs."""
    import json

    d = tmp_path_factory.mktemp("shared-train-data")
    (d / "alpaca.json").write_text(json.dumps(ALPACA, indent=1), encoding="utf-8")
    (d / "messages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MESSAGES), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def full_run(neftune_cache, shared_train_data, tmp_path_factory) -> tuple[Path, str]:
    """(run directory, stdout) of one ``neftune train --full`` on the tiny model: 4 steps on the 4 first
    alpaca records, held-out messages, eval and checkpoints every 2 steps, alpha 5, seed 3.

    Shared by the whole session: tests read it and must not write into it (copy it first).
    """
    out = tmp_path_factory.mktemp("full") / "run"
    argv = [
        *("--model", "tiny-random", "--data", str(shared_train_data / "alpaca.json")),
        *("--eval-data", str(shared_train_data / "messages.jsonl"), "--output", str(out), "--full"),
        *("--max-steps", "4", "--batch-size", "2", "--alpha", "5", "--seed", "3", "--lr", "1e-3", "--no-progress"),
        *("data.limit=4", "train.save_steps=2", "train.eval_steps=2", "train.logging_steps=1"),
    ]
    return out, _train_once(neftune_cache, argv)


@pytest.fixture(scope="session")
def lora_run(neftune_cache, shared_train_data, tmp_path_factory) -> Path:
    """The run directory of one ``neftune train --lora --merge`` on the tiny model (messages JSONL, 3
    steps): ``model/`` holds the adapter, ``merged/`` the merged weights.  Shared like :func:`full_run`."""
    out = tmp_path_factory.mktemp("lora") / "run"
    argv = [
        *("--model", "tiny-random", "--data", str(shared_train_data / "messages.jsonl"), "--output", str(out)),
        *("--lora", "--merge", "--max-steps", "3", "--batch-size", "2", "--lr", "2e-2", "--no-progress"),
    ]
    _train_once(neftune_cache, argv)
    return out


@pytest.fixture(autouse=True)
def _single_thread_torch():
    torch.set_num_threads(1)
    yield
