"""`neftune train --method dpo`: preference data in every accepted layout, its errors, and a run end to end."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tests.helpers import record_dpo_forwards
from transformers import TrainerCallback

from neftune.checkpoints import MANIFEST
from neftune.cli import main
from neftune.compare_config import CompareConfig
from neftune.config import Config, load_config
from neftune.data.preference import load_pairs
from neftune.errors import ConfigError, DataError
from neftune.train import run_training

USER, ASSISTANT = "user", "assistant"


def _conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": answer}]


def ultrafeedback_pairs(n: int) -> list[dict]:
    """The UltraFeedback-binarized shape: a prompt string and two whole conversations, plus scores."""
    out = []
    for i in range(n):
        prompt = f"Name a colour, please ({i})." + " Be brief." * (i % 3)
        out.append(
            {
                "prompt": prompt,
                "prompt_id": f"p{i}",
                "chosen": _conversation(prompt, "Blue." * (1 + i % 2)),
                "rejected": _conversation(prompt, "I would rather talk about something else entirely. " * (1 + i % 3)),
                "score_chosen": 8.0,
                "score_rejected": 2.0,
            }
        )
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- reading preference data -------------------------------------------------------------------


def test_every_layout_reads_to_the_same_prompt_and_answers(tmp_path):
    conv = {"prompt": [{"role": USER, "content": "Hi?"}], "chosen": [{"role": ASSISTANT, "content": "Hello."}]}
    conv["rejected"] = [{"role": ASSISTANT, "content": "Go away."}]
    sharegpt_roles = {
        "chosen": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
        "rejected": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Go away."}],
    }
    records = [
        ultrafeedback_pairs(1)[0]
        | {"prompt": "Hi?", "chosen": _conversation("Hi?", "Hello.")}
        | {"rejected": _conversation("Hi?", "Go away.")},
        conv,
        conv | {"prompt": "Hi?"},  # a prompt string is one user turn
        sharegpt_roles,  # implicit prompt, ShareGPT's from/value and role names
    ]
    loaded = load_pairs(str(write_jsonl(tmp_path / "p.jsonl", records)))
    assert loaded.total == 4 and not loaded.skipped
    for pair in loaded.pairs:
        assert pair.to_trl() == {
            "prompt": [{"role": USER, "content": "Hi?"}],
            "chosen": [{"role": ASSISTANT, "content": "Hello."}],
            "rejected": [{"role": ASSISTANT, "content": "Go away."}],
        }


def test_multi_turn_conversations_share_their_history_as_the_prompt(tmp_path):
    history = [*_conversation("Hi?", "Hello."), {"role": USER, "content": "And now?"}]
    record = {
        "chosen": [*history, {"role": ASSISTANT, "content": "Now we talk."}],
        "rejected": [*history, {"role": ASSISTANT, "content": "Bye."}],
    }
    (pair,) = load_pairs(str(write_jsonl(tmp_path / "hh.jsonl", [record]))).pairs
    assert pair.prompt == history
    assert pair.chosen == [{"role": ASSISTANT, "content": "Now we talk."}]


def test_plain_strings_stay_plain(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    (pair,) = load_pairs(str(path)).pairs
    assert pair.to_trl() == {"prompt": "2+2=", "chosen": "4", "rejected": "5"} and not pair.conversational


BAD = [
    ({"prompt": "2+2=", "chosen": "4"}, "missing field 'rejected'"),
    ({"chosen": "4", "rejected": "5"}, "missing field 'prompt'"),
    ({"prompt": "2+2=", "chosen": 4, "rejected": "5"}, "wrong type: field 'chosen' is a number"),
    ({"prompt": "2+2=", "chosen": "4", "rejected": "4"}, "chosen equals rejected"),
    ({"prompt": " ", "chosen": "4", "rejected": "5"}, "empty instruction"),
    ({"prompt": "2+2=", "chosen": "", "rejected": "5"}, "empty response ('chosen' is blank)"),
    ({"chosen": [{"role": "alien", "content": "x"}], "rejected": []}, "unknown role 'alien' in chosen turn 1"),
    (
        {"prompt": "Hi?", "chosen": _conversation("Hi?", "a"), "rejected": _conversation("Other?", "b")},
        "no answer: 'chosen' must end in assistant turns after the prompt",
    ),
    ([1, 2], "record is an array, not an object"),
]


@pytest.mark.parametrize(("record", "message"), BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_a_bad_record_is_one_line_naming_file_and_line_or_is_skipped_and_counted(tmp_path, record, message):
    good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, record, good])
    with pytest.raises(DataError) as caught:
        load_pairs(str(path))
    text = str(caught.value)
    assert text.startswith(f"{path}:2:") or text.startswith(f"{path} line 2"), text
    assert message in text and "\n" not in text
    skipped = load_pairs(str(path), on_bad_record="skip")
    assert len(skipped.pairs) == 2 and skipped.total == 3 and sum(skipped.skipped.values()) == 1


def test_plain_and_conversational_pairs_cannot_be_mixed(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, ultrafeedback_pairs(1)[0]]
    )
    with pytest.raises(DataError, match="the first pair's answers are plain strings"):
        load_pairs(str(path))


def test_builtin_skills_become_pairs_of_the_right_answer_over_a_wrong_one_of_the_same_family():
    from neftune.data.formats import load_examples

    loaded = load_pairs("builtin:skills", limit=50)
    examples = load_examples("builtin:skills", limit=50).examples
    assert len(loaded.pairs) == 50
    for pair, example in zip(loaded.pairs, examples, strict=True):
        assert pair.prompt == example.prompt_messages
        assert pair.chosen == [{"role": ASSISTANT, "content": example.reference}]
        assert pair.rejected != pair.chosen
    with pytest.raises(DataError, match="no rejected answers"):
        load_pairs("builtin:sharegpt")


# -- config and CLI ----------------------------------------------------------------------------


def test_method_and_beta_are_validated_with_one_line_errors(capsys):
    with pytest.raises(ConfigError, match=r"train\.method must be one of sft, dpo"):
        load_config(Config, None, ["train.method=ppo"]).validate()
    with pytest.raises(ConfigError, match=r"train\.dpo_beta must be a finite number > 0"):
        load_config(Config, None, ["train.method=dpo", "train.dpo_beta=0"]).validate()
    with pytest.raises(ConfigError, match=r"compare trains with train\.method=sft"):
        load_config(CompareConfig, None, ["train.method=dpo"]).validate()
    assert main(["train", "--method", "ppo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.method must be one of sft, dpo" in err[0]


# -- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(neftune_cache):
    """The session's neftune cache (tests/conftest.py), tiny-random built."""
    return neftune_cache


class RecordForwards(TrainerCallback):
    """Records every forward of the trained model (record_dpo_forwards) for the length of train()."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.records: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.records = self.stack.enter_context(record_dpo_forwards(model))

    def on_train_end(self, args, state, control, **kwargs):
        self.stack.close()


def test_dpo_run_writes_the_model_and_summary_and_never_noises_the_reference(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(cache))
    records = [*ultrafeedback_pairs(12), {"prompt": "x", "chosen": [], "rejected": []}]
    data = write_jsonl(tmp_path / "uf.jsonl", records)
    out = tmp_path / "run"
    cfg = load_config(
        Config,
        None,
        [
            "model.name=tiny-random",
            f"data.train={data}",
            "data.on_bad_record=skip",
            f"train.output={out}",
            "train.method=dpo",
            "train.max_steps=2",
            "train.batch_size=3",
            "train.logging_steps=1",
            "train.progress=false",
            "noise.alpha=10",
        ],
    )
    recorder = RecordForwards()
    result = run_training(cfg, extra_callbacks=[recorder])

    assert (out / "model" / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "model" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and not (out / "model" / "ref").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["method"] == "dpo" and summary["max_steps"] == 2
    assert summary["train_pairs"] == 12 and summary["train_records"] == 13
    assert summary["train_skipped"] == {"empty response": 1}
    assert {"rewards/margins", "rewards/accuracies", "train_loss"} <= set(summary)
    assert result.model_dir == out / "model"

    reference = [r for r in recorder.records if r["reference"]]
    policy = [r for r in recorder.records if not r["reference"]]
    assert len(reference) == len(policy) == 2
    assert all(r["noise"].abs().max() == 0 for r in reference)
    d = policy[0]["noise"].shape[-1]
    for r in policy:
        for row, mask in enumerate(r["attention_mask"]):
            n = int(mask.sum())
            peak = r["noise"][row, :n].abs().max().item() * math.sqrt(n * d) / 10.0
            assert 0.9 < peak <= 1 + 1e-5


def test_cli_full_finetuning_dpo_on_generated_pairs_saves_full_weights(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEFTUNE_CACHE", str(cache))
    out = tmp_path / "full"
    argv = ["train", "--method", "dpo", "--full", "--model", "tiny-random", "--max-steps", "2", "--batch-size", "2"]
    argv += ["--output", str(out), "--no-progress", "data.limit=16"]  # the default data: builtin:skills as pairs
    assert main(argv) == 0
    assert f"model: {out / 'model'}" in capsys.readouterr().out
    assert (out / "model" / "model.safetensors").is_file() and not (out / "model" / "adapter_config.json").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["reference"] == "frozen copy of the starting model"
    assert summary["train"] == "builtin:skills" and summary["train_pairs"] == 16


def test_dpo_resumes_after_a_crash_to_the_same_weights_from_whole_checkpoints(cache, tmp_path, monkeypatch):
    from tests.test_train import KillAtStep, Killed

    monkeypatch.setenv("NEFTUNE_CACHE", str(cache))
    data = write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_pairs(16))

    def cfg(out: Path, *extra: str) -> Config:
        base = [
            "model.name=tiny-random",
            f"data.train={data}",
            f"train.output={out}",
            "train.method=dpo",
            "train.max_steps=4",
            "train.save_steps=2",
            "train.batch_size=2",
            "train.logging_steps=1",
            "train.progress=false",
            "train.lr=1e-2",
            "noise.alpha=5",
        ]
        return load_config(Config, None, [*base, *extra])

    a = run_training(cfg(tmp_path / "a"))
    with pytest.raises(Killed):  # dies during step 4, after checkpoint-2 was written
        run_training(cfg(tmp_path / "b"), extra_callbacks=[KillAtStep(3)])
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["checkpoint-2"] and (tmp_path / "b" / "checkpoints" / "checkpoint-2" / MANIFEST).is_file()
    b = run_training(cfg(tmp_path / "b", "train.resume=true"))
    assert [step for step, _ in b.loss_curve] == [3, 4]
    assert [loss for _, loss in b.loss_curve] == pytest.approx([loss for _, loss in a.loss_curve[2:]], abs=1e-6)
    wa = load_file(a.model_dir / "adapter_model.safetensors")
    wb = load_file(b.model_dir / "adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
