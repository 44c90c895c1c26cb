"""The Arrow data pipeline: its on-disk cache, the automatic held-out split, hub-style sources and streaming."""

from __future__ import annotations

import json
import logging
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from neftune.cli import main
from neftune.config import Config, load_config
from neftune.data import pipeline
from neftune.data.pipeline import HOLDOUT_SEED, Request, normalize, tokenize
from neftune.data.prepare import heldout_examples, read_training_data, tokenize_training_data
from neftune.data.readers import read_records
from neftune.data.sources import open_records
from neftune.errors import DataError
from neftune.train import run_training


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(tmp_path / "cache"))


def sharegpt(path: Path, n: int, *, start: int = 0) -> Path:
    rng = random.Random(start)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with path.open("w", encoding="utf-8") as handle:
        for i in range(start, start + n):
            question = f"question {i}: " + " ".join(rng.choice(words) for _ in range(8))
            answer = f"answer {i}: " + " ".join(rng.choice(words) for _ in range(12))
            turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            handle.write(json.dumps({"conversations": turns}) + "\n")
    return path


def cfg(out: Path, data: Path | str, *overrides: str) -> Config:
    base = [
        "model.name=tiny-random",
        f"data.train={data}",
        f"train.output={out}",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.logging_steps=1",
        "train.progress=false",
        "train.save_steps=50",
    ]
    return load_config(Config, None, base + list(overrides))


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def entries(root: Path, stage: str) -> list[str]:
    return sorted(p.name for p in (root / "data" / stage).iterdir() if p.is_dir() and not p.name.startswith("."))


# -- the cache ---------------------------------------------------------------------------------


def test_a_second_run_reuses_both_cache_entries_and_a_changed_file_rebuilds(tmp_path):
    data = sharegpt(tmp_path / "d.jsonl", 40)
    first = run_training(cfg(tmp_path / "a", data))
    a = summary(tmp_path / "a")
    assert a["data_cache"] == str(tmp_path / "cache" / "data") and a["data_cache_reused"] is False
    assert a["train_examples"] == 40 and all(Path(p).is_dir() for p in a["data_cache_entries"])

    second = run_training(cfg(tmp_path / "b", data))
    b = summary(tmp_path / "b")
    assert b["data_cache_reused"] is True and b["data_cache_entries"] == a["data_cache_entries"]
    assert first.loss_curve == second.loss_curve  # the cached tokens are the tokens

    # another max_length re-tokenizes but reuses the normalized examples
    run_training(cfg(tmp_path / "c", data, "data.max_length=300"))
    c = summary(tmp_path / "c")
    assert c["data_cache_entries"][0] == a["data_cache_entries"][0]
    assert c["data_cache_entries"][1] != a["data_cache_entries"][1]

    # one byte of the file changed: both stages are built again
    data.write_text(data.read_text().replace("question 3:", "question 3;"))
    run_training(cfg(tmp_path / "d", data))
    d = summary(tmp_path / "d")
    assert d["data_cache_reused"] is False and set(d["data_cache_entries"]).isdisjoint(a["data_cache_entries"])
    assert len(entries(tmp_path / "cache", "normalized")) == 2


def test_data_cache_dir_moves_the_cache_and_is_not_part_of_an_arms_fingerprint(tmp_path):
    from neftune.fingerprint import train_settings

    data = sharegpt(tmp_path / "d.jsonl", 12)
    run_training(cfg(tmp_path / "a", data, f"data.cache_dir={tmp_path / 'elsewhere'}"))
    assert summary(tmp_path / "a")["data_cache"] == str(tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "normalized").is_dir() and not (tmp_path / "cache" / "data").exists()
    one = train_settings(cfg(tmp_path / "a", data))
    other = train_settings(cfg(tmp_path / "a", data, "data.cache_dir=/x", "data.num_proc=2"))
    assert one == other


def test_a_build_that_dies_leaves_no_entry_and_the_next_run_builds_it(tmp_path, monkeypatch, tiny_tokenizer):
    data = sharegpt(tmp_path / "d.jsonl", 20)
    root = tmp_path / "root"
    normalized = normalize(Request(spec=str(data)), root)

    def dies(*args, **kwargs):
        (args[3] / "tokens.arrow").write_bytes(b"half a table")
        raise KeyboardInterrupt  # the process is killed in the middle of tokenizing

    monkeypatch.setattr(pipeline, "_tokenize_into", dies)
    with pytest.raises(KeyboardInterrupt):
        tokenize(normalized, tiny_tokenizer, 400, root)
    assert [p for p in (root / "tokenized").iterdir() if not p.name.startswith(".")] == []
    monkeypatch.undo()
    built = tokenize(normalized, tiny_tokenizer, 400, root)
    assert built.built and len(built.part(np.arange(20))[0]) == 20


# -- the automatic held-out split ---------------------------------------------------------------


def test_the_automatic_split_is_disjoint_seed_independent_and_sized_as_asked(tmp_path):
    data = sharegpt(tmp_path / "d.jsonl", 50)
    indices = {}
    for seed in (0, 7):
        c = cfg(tmp_path / "o", data, "data.eval_size=0.2", f"train.seed={seed}")
        read = read_training_data(c.data, seed=seed)
        held, train = read.train.heldout_indices(), read.train.train_indices()
        assert len(held) == 10 and len(train) == 40 and set(held).isdisjoint(train)
        assert sorted([*held, *train]) == list(range(50))
        indices[seed] = held.tolist()
    assert indices[0] == indices[7]
    assert indices[0] == sorted(np.random.default_rng(HOLDOUT_SEED).choice(50, 10, replace=False).tolist())

    c = cfg(tmp_path / "o", data, "data.eval_size=0.2")
    loaded = heldout_examples(c.data, limit=None)
    numbers = sorted(int(e.messages[0]["content"].split(":")[0].split()[1]) for e in loaded.examples)
    assert numbers == indices[0] and loaded.source == f"{data} (held out: eval_size=0.2)"

    run_training(cfg(tmp_path / "t", data, "data.eval_size=5", "train.eval_steps=3"))
    s = summary(tmp_path / "t")
    assert s["train_examples"] == 45 and s["eval_examples"] == 5 and s["eval"] == f"{data} (held out: eval_size=5)"
    assert s["heldout_loss"] > 0


def test_compare_holds_out_a_tenth_of_a_training_file_and_never_trains_on_it(tmp_path, caplog):
    data = sharegpt(tmp_path / "d.jsonl", 60)
    out = tmp_path / "exp"
    args = ["compare", "--model", "tiny-random", "--data", str(data), "--max-steps", "2", "--alphas", "5"]
    args += ["--seeds", "0", "--judge", "none", "--eval-limit", "4", "--max-new-tokens", "4"]
    with caplog.at_level(logging.INFO, logger="neftune"):
        assert main([*args, "--output", str(out), "--no-progress"]) == 0
    assert "holding out data.eval_size=0.1" in caplog.text
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["eval"] == f"{data} (held out: eval_size=0.1)" and results["data"]["n_eval"] == 4
    for arm in ("alpha0", "alpha5"):
        assert summary(out / "arms" / arm)["train_examples"] == 54
    held = {
        int(o["instruction"].split(":")[0].split()[1])
        for o in json.loads((out / "arms/alpha0/outputs.json").read_text())
    }
    chosen = set(np.random.default_rng(HOLDOUT_SEED).choice(60, 6, replace=False).tolist())
    assert held <= chosen and len(held) == 4
    assert "eval_size: 0.1" in (out / "config.yaml").read_text()
    # both arms read the training data once: one normalized and one tokenized entry
    assert len(entries(tmp_path / "cache", "normalized")) == 1 and len(entries(tmp_path / "cache", "tokenized")) == 1


def test_eval_size_errors_name_the_setting(tmp_path, capsys):
    data = sharegpt(tmp_path / "d.jsonl", 4)
    base = ["train", "--model", "tiny-random", "--data", str(data), "--output", str(tmp_path / "o"), "--no-progress"]
    for value, words in [
        ("4", "data.eval_size=4 would hold out 4 of 4 usable examples, leaving none to train on"),
        ("2.5", "data.eval_size above 1 is a count of examples and must be whole"),
        ("0", "data.eval_size must be a count >= 1 or a share in (0, 1)"),
    ]:
        assert main([*base, "--eval-size", value]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err and "Traceback" not in err
    assert main([*base, "--streaming", "--max-steps", "2", "--eval-size", "0.5"]) == 2
    assert "data.streaming holds out a count of examples" in capsys.readouterr().err
    assert main([*base, "--eval-size", "2", "--eval-data", str(data)]) == 2
    assert "it cannot be combined with data.eval (--eval-data" in capsys.readouterr().err
    assert main([*base, "--data-split", "test"]) == 2
    assert "data.split='test' chooses a split of a datasets directory" in capsys.readouterr().err
    skills = ["train", "--model", "tiny-random", "--data", "builtin:skills", "--output", str(tmp_path / "s")]
    assert main([*skills, "--eval-size", "8"]) == 2
    assert "builtin:skills has its own held-out split" in capsys.readouterr().err


# -- sources: dataset repositories and hub ids ----------------------------------------------------


def repository(path: Path) -> Path:
    (path / "data").mkdir(parents=True)
    sharegpt(path / "data" / "train.jsonl", 10)
    sharegpt(path / "data" / "test.jsonl", 3, start=100)
    return path


def test_a_dataset_repository_is_read_by_datasets_with_its_splits(tmp_path):
    repo = repository(tmp_path / "owner_set")
    notes: list[str] = []
    train = list(open_records(str(repo), split="train", subset=None, notes=notes).records)
    test = open_records(str(repo), split="test", subset=None, notes=notes)
    assert len(train) == 10 and test.size == 3
    assert [r[2]["conversations"][0]["value"].split(":")[0] for r in test.records] == [
        "question 100",
        "question 101",
        "question 102",
    ]
    with pytest.raises(DataError) as err:
        open_records(str(repo), split="validation", subset=None, notes=notes)
    assert str(repo) in str(err.value) and "validation" in str(err.value) and "\n" not in str(err.value)

    run_training(cfg(tmp_path / "o", repo, "data.split=test"))
    assert summary(tmp_path / "o")["train_examples"] == 3


def test_a_hub_id_that_cannot_be_reached_offline_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    argv = ["train", "--model", "tiny-random", "--data", "nobody-here/no-such-set", "--output", str(tmp_path / "o")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neftune: error: nobody-here/no-such-set") and "\n" not in err
    assert "offline" in err.lower()
    # a missing local file is a missing file, not a hub id
    assert main([*argv[:4], "nobody/here.jsonl", *argv[5:], "--no-progress"]) == 2
    assert "nobody/here.jsonl: no such file or directory" in capsys.readouterr().err


# -- reading in constant memory ---------------------------------------------------------------------


def test_json_lines_are_read_in_memory_that_does_not_grow_with_the_file(tmp_path):
    small, large = sharegpt(tmp_path / "s.jsonl", 2_000), sharegpt(tmp_path / "l.jsonl", 20_000)

    def peak(path: Path) -> int:
        tracemalloc.start()
        count = sum(1 for _ in read_records(path, path.name, "train", []))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count in (2_000, 20_000)
        return top

    assert large.stat().st_size > 2_000_000
    assert peak(large) < 2 * peak(small) + 200_000  # ten times the file, not ten times the memory


# -- streaming ----------------------------------------------------------------------------------


def test_streaming_trains_holds_out_the_first_examples_and_resumes_exactly(tmp_path):
    data = sharegpt(tmp_path / "d.jsonl", 80)
    common = ["data.streaming=true", "data.eval_size=6", "data.shuffle_buffer=16", "train.max_steps=4"]
    common += ["train.save_steps=2", "noise.alpha=5", "train.lr=1e-2"]
    a = run_training(cfg(tmp_path / "a", data, *common))
    s = summary(tmp_path / "a")
    assert s["train_streaming"] is True and s["eval_examples"] == 6 and s["heldout_loss"] > 0
    assert not (tmp_path / "cache" / "data" / "tokenized").exists()  # nothing tokenized ahead of time

    from tests.test_train import KillAtStep, Killed

    with pytest.raises(Killed):
        run_training(cfg(tmp_path / "b", data, *common), extra_callbacks=[KillAtStep(3)])
    b = run_training(cfg(tmp_path / "b", data, *common, "train.resume=true"))
    assert [step for step, _ in b.loss_curve] == [3, 4]
    assert [loss for _, loss in b.loss_curve] == pytest.approx([loss for _, loss in a.loss_curve[2:]], abs=1e-6)
    wa = load_file(a.model_dir / "adapter_model.safetensors")
    wb = load_file(b.model_dir / "adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


def test_streaming_counts_what_it_dropped(tmp_path, tiny_tokenizer):
    data = sharegpt(tmp_path / "d.jsonl", 30)
    c = cfg(tmp_path / "o", data, "data.streaming=true", "data.max_length=75", "train.max_steps=2")
    read = read_training_data(c.data, seed=0)
    prepared = tokenize_training_data(c.data, tiny_tokenizer, read)
    rows = list(prepared.train)
    account = prepared.stream
    assert sum(account.dropped.values()) + len(rows) == 30 and all(len(r["input_ids"]) <= 75 for r in rows)
    assert account.dropped and rows  # some prompts fill the 75 tokens, some leave room for an answer


def test_a_changed_chat_template_or_max_length_is_a_new_tokenized_entry(tmp_path, tiny_tokenizer):
    import copy

    data = sharegpt(tmp_path / "d.jsonl", 10)
    root = tmp_path / "root"
    normalized = normalize(Request(spec=str(data)), root)
    first = tokenize(normalized, tiny_tokenizer, 400, root)
    assert tokenize(normalized, tiny_tokenizer, 400, root).directory == first.directory  # reused
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = tiny_tokenizer.chat_template.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    assert other.chat_template != tiny_tokenizer.chat_template
    changed = tokenize(normalized, other, 400, root)
    assert changed.built and changed.directory != first.directory
    assert tokenize(normalized, tiny_tokenizer, 300, root).directory not in (first.directory, changed.directory)


def test_a_folder_of_data_files_is_read_as_a_repository_and_an_empty_folder_is_one_line(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    sharegpt(folder / "train.jsonl", 6)
    sharegpt(folder / "test.jsonl", 2, start=50)
    notes: list[str] = []
    assert len(list(open_records(str(folder), split="train", subset=None, notes=notes).records)) == 6
    assert len(list(open_records(str(folder), split="test", subset=None, notes=notes).records)) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        list(open_records(str(empty), split="train", subset=None, notes=notes).records)
    assert str(empty) in str(err.value) and "\n" not in str(err.value)
