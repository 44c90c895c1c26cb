"""``neftune train`` end to end on the tiny random model: output directory, loadable models, data
formats, packing, exact resume, atomic saves, two CPU processes and the embedded default budget."""

from __future__ import annotations

import errno
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.helpers import ALPACA, MESSAGES, SECRET, record_noise
from transformers import TrainerCallback

import neftune
from neftune.cli import main
from neftune.config import Config, load_config, to_dict
from neftune.data.collate import PaddingCollator, packing_collator
from neftune.data.formats import Example
from neftune.data.presets import get_preset
from neftune.data.template import IGNORE_INDEX, encode_examples
from neftune.io import atomic_save_dir
from neftune.train import run_training, training_arguments

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "and 3+3?"},
            {"from": "gpt", "value": "6"},
        ]
    },
    {"conversations": [{"from": "human", "value": "Reverse abc"}, {"from": "gpt", "value": "cba"}]},
]


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _env(neftune_cache, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(neftune_cache))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("RANK", raising=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_json(d / "alpaca.json", ALPACA)
    write_json(d / "sharegpt.json", SHAREGPT)
    write_jsonl(d / "messages.jsonl", MESSAGES)
    write_jsonl(d / "alpaca.jsonl", ALPACA)
    return d


def cfg_for(out: Path, data: Path, *overrides: str) -> Config:
    base = [
        "model.name=tiny-random",
        f"data.train={data}",
        f"train.output={out}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.logging_steps=1",
        "train.progress=false",
        "train.save_steps=50",
    ]
    return load_config(Config, None, base + list(overrides))


def leftovers(directory: Path) -> list[str]:
    """Temporary files or directories left behind by atomic writes."""
    return sorted(p.name for p in directory.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


# -- the CLI end to end ------------------------------------------------------------------------


# full_run and lora_run: the session's shared runs (tests/conftest.py)


def test_cli_writes_the_output_directory(full_run):
    out, stdout = full_run
    assert f"model: {out / 'model'}" in stdout and stdout.startswith("done: ")

    written = yaml.safe_load((out / "config.yaml").read_text())
    assert set(written) == {"model", "data", "noise", "train"}
    # resolved values: defaults, flags and key=value overrides all land in the file
    assert written["model"]["name"] == "tiny-random" and written["model"]["lora"] is False
    assert written["data"]["limit"] == 4 and written["data"]["packing"] is True
    assert written["noise"]["alpha"] == 5.0 and written["noise"]["distribution"] == "uniform"
    assert written["train"].items() >= {"max_steps": 4, "batch_size": 2, "seed": 3, "lr": 1e-3, "save_steps": 2}.items()
    assert written["train"]["output"] == str(out)
    assert load_config(Config, out / "config.yaml").train.max_steps == 4  # the file reloads as a config

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["tokens_per_s"] >= 0 and "learning_rate" in r for r in losses)
    assert {r["step"] for r in evals} == {2, 4} and all(r["eval_loss"] > 0 for r in evals)

    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # every TensorBoard event file is under tensorboard/, including the final held-out evaluation
    assert {p.parent.name for p in out.rglob("events.out.tfevents.*")} == {"tensorboard"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "model" / name).is_file(), name
    assert not list((out / "model").glob("*.bin")) and not list((out / "model").glob("*.pt"))
    assert leftovers(out) == []

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["train_examples"] == 4 and summary["max_steps"] == 4 and summary["heldout_loss"] > 0
    assert [step for step, _ in summary["loss_curve"]] == [1, 2, 3, 4]
    # nothing from the environment's secrets reaches a file
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl", ".txt"):
            assert SECRET not in path.read_text(errors="replace"), path


def test_config_redacts_secret_looking_fields():
    from dataclasses import dataclass, field

    @dataclass
    class Judge:
        api_key: str = "sk-live-123"
        hf_token: str = "hf_abc"
        password: str = "hunter2"
        api_key_env: str = "OPENAI_API_KEY"  # the name of a variable, not a secret
        max_new_tokens: int = 64  # "tokens" is not a token

    @dataclass
    class Top:
        judge: Judge = field(default_factory=Judge)

    data = to_dict(Top())["judge"]
    assert data == {
        "api_key": "***",
        "hf_token": "***",
        "password": "***",
        "api_key_env": "OPENAI_API_KEY",
        "max_new_tokens": 64,
    }
    assert to_dict(Top(), redact=False)["judge"]["api_key"] == "sk-live-123"


LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel

    full, adapter, merged = sys.argv[1:4]
    ids = torch.tensor([[5, 17, 99, 120, 3, 44, 70]])

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    result = {}
    model = AutoModelForCausalLM.from_pretrained(full)
    tok = AutoTokenizer.from_pretrained(full)
    result["full_finite"] = bool(torch.isfinite(logits(model)).all())
    result["full_template"] = "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    result["full_pad"] = tok.pad_token

    base_path = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    trained = model.state_dict()
    result["full_changed"] = max((trained[k] - v).abs().max().item() for k, v in base.state_dict().items())
    base_logits = logits(base)
    peft_model = PeftModel.from_pretrained(base, adapter)
    AutoTokenizer.from_pretrained(adapter)
    adapted = logits(peft_model)
    merged_model = AutoModelForCausalLM.from_pretrained(merged)
    AutoTokenizer.from_pretrained(merged)
    result["merged_vs_adapter"] = (logits(merged_model) - adapted).abs().max().item()
    result["adapter_vs_base"] = (adapted - base_logits).abs().max().item()
    result["merged_has_lora"] = any("lora" in k for k in merged_model.state_dict())
    result["neftune_imported"] = sorted(m for m in sys.modules if m == "neftune" or m.startswith("neftune."))
    print(json.dumps(result))
    """
)


def test_saved_models_load_with_plain_transformers_in_a_fresh_process(full_run, lora_run, tmp_path):
    out, _ = full_run
    adapter, merged = lora_run / "model", lora_run / "merged"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "config.json").exists()
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {**os.environ, **OFFLINE}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(out / "model"), str(adapter), str(merged)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["neftune_imported"] == []
    assert result["full_finite"] and result["full_template"] and result["full_pad"] == "<pad>"
    assert result["full_changed"] > 1e-4  # trained weights were saved, not the base
    assert result["adapter_vs_base"] > 1e-4  # the adapter does something ...
    assert result["merged_vs_adapter"] < 1e-4  # ... and merged weights do the same
    assert not result["merged_has_lora"]


# -- data formats ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "records"),
    [("alpaca.json", len(ALPACA)), ("sharegpt.json", len(SHAREGPT)), ("messages.jsonl", len(MESSAGES))],
)
def test_each_data_format_trains(data_dir, tmp_path, filename, records):
    result = run_training(cfg_for(tmp_path / "out", data_dir / filename, "train.max_steps=1", "model.lora=false"))
    assert result.metrics["train_records"] == records and result.metrics["train_examples"] == records
    assert result.metrics["train_skipped"] == {} and result.metrics["train_dropped"] == {}
    assert result.loss_curve and result.loss_curve[0][1] > 0
    assert (result.model_dir / "model.safetensors").is_file()


# -- packing -----------------------------------------------------------------------------------


def _per_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of labels[t + 1] given logits[t] for one row, and the mask of positions that count."""
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), labels[1:].clamp(min=0), reduction="none")
    return nll, labels[1:] != IGNORE_INDEX


def test_packed_and_padded_batches_give_the_same_per_example_loss(tiny_model, tiny_tokenizer):
    conversations = [
        ("Say hi", "hi there"),
        ("Add 2 and 3, please", "5"),
        ("Reverse the word apple", "elppa, that is"),
        ("x", "y" * 30),
        ("What is the capital of France? Answer in one word.", "Paris"),
    ]
    examples = [
        Example([{"role": "user", "content": u}, {"role": "assistant", "content": a}]) for u, a in conversations
    ]
    rows, dropped = encode_examples(tiny_tokenizer, examples, 512)
    assert not dropped and len({len(r["input_ids"]) for r in rows}) > 1
    model = tiny_model.eval()

    packed = packing_collator()(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    starts = [*(packed["position_ids"][0] == 0).nonzero().flatten().tolist(), packed["input_ids"].shape[1]]
    assert len(starts) == len(rows) + 1

    def packed_losses(**kwargs):
        with torch.no_grad():
            logits = model(input_ids=packed["input_ids"], use_cache=False, **kwargs).logits[0]
        nll, mask = _per_token_nll(logits, packed["labels"][0])
        # example k owns the predictions made from its own tokens s..e-2 (of labels s+1..e-1)
        return [nll[s : e - 1][mask[s : e - 1]].mean().item() for s, e in itertools.pairwise(starts)]

    padded = PaddingCollator(tiny_tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
    padded_losses = []
    for i in range(len(rows)):
        nll, mask = _per_token_nll(logits[i], padded["labels"][i])
        padded_losses.append(nll[mask].mean().item())

    assert packed_losses(position_ids=packed["position_ids"]) == pytest.approx(padded_losses, abs=1e-4)
    # without the restarting position ids the examples would attend to each other: the check has teeth
    leaky = packed_losses()
    assert max(abs(a - b) for a, b in zip(leaky, padded_losses, strict=False)) > 1e-3


# -- one held-out loss -------------------------------------------------------------------------


def _heldout_examples() -> list[Example]:
    """Answers of very different lengths: a long repetitive one the model learns, short ones it does not."""
    answers = ["la " * 150, "7", "no", "a quick brown fox", "ok then", "x"]
    return [
        Example([{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a.strip()}])
        for i, a in enumerate(answers)
    ]


def _by_hand(model, tokenizer, examples) -> tuple[float, float]:
    """(token-weighted mean, mean of per-batch means over batches of 2 in length order) of the
    assistant tokens' cross-entropy, each example run alone in float64."""
    rows, _ = encode_examples(tokenizer, examples, 512)
    per_example = []
    with torch.no_grad():
        for row in rows:
            logits = model.eval()(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            nll, mask = _per_token_nll(logits, torch.tensor(row["labels"]))
            per_example.append((float(nll[mask].sum()), int(mask.sum()), len(row["input_ids"])))
    token_weighted = sum(n for n, _, _ in per_example) / sum(k for _, k, _ in per_example)
    ordered = sorted(per_example, key=lambda e: -e[2])
    batches = [ordered[i : i + 2] for i in range(0, len(ordered), 2)]
    batch_means = sum(sum(n for n, _, _ in b) / sum(k for _, k, _ in b) for b in batches) / len(batches)
    return token_weighted, batch_means


def test_one_heldout_loss_in_metrics_summary_and_eval(data_dir, tmp_path):
    from neftune.evaluate import heldout_loss

    examples = _heldout_examples()
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"messages": e.messages} for e in examples])
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": examples[0].messages}] * 8)
    cfg = cfg_for(
        tmp_path / "out",
        train,
        f"data.eval={heldout}",
        "model.lora=false",
        "train.lr=1e-2",
        "train.max_steps=4",
        "train.eval_steps=2",
        "train.batch_size=2",
        "noise.alpha=5",
    )
    result = run_training(cfg, keep_model=True)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(logged) == [2, 4]
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["heldout_loss"] == pytest.approx(logged[4], abs=1e-12)
    assert summary["heldout_curve"][-1] == [4, pytest.approx(logged[4], abs=1e-12)]

    model, tokenizer = result.model, result.tokenizer
    for batch_size in (1, 4):  # neftune eval / compare at any batch size
        measured = heldout_loss(model, tokenizer, examples, max_length=512, batch_size=batch_size)
        assert measured["loss"] == pytest.approx(logged[4], abs=1e-5)
    token_weighted, batch_means = _by_hand(model, tokenizer, examples)
    assert logged[4] == pytest.approx(token_weighted, abs=1e-5)
    # the mean of per-batch means (what the Trainer's own evaluation reported) is another number here
    assert abs(batch_means - token_weighted) > 0.05


# -- resume ------------------------------------------------------------------------------------


class Killed(Exception):
    pass


class KillAtStep(TrainerCallback):
    """Raise at the start of an optimizer step, like a process killed mid-run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_after_a_crash_matches_the_uninterrupted_run(data_dir, tmp_path, lora):
    data = data_dir / "alpaca.jsonl"
    common = ["train.max_steps=5", "train.save_steps=2", "noise.alpha=5", "train.lr=1e-2", f"model.lora={lora}"]
    weights = "adapter_model.safetensors" if lora else "model.safetensors"

    a = run_training(cfg_for(tmp_path / "a", data, *common))

    with pytest.raises(Killed):  # dies during step 4, after checkpoint-2 was written
        run_training(cfg_for(tmp_path / "b", data, *common), extra_callbacks=[KillAtStep(3)])
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir() if p.is_dir()) == ["checkpoint-2"]
    assert not (tmp_path / "b" / "model").exists()
    b = run_training(cfg_for(tmp_path / "b", data, *common, "train.resume=true"))
    assert [step for step, _ in b.loss_curve] == [3, 4, 5]
    assert [loss for _, loss in b.loss_curve] == pytest.approx([loss for _, loss in a.loss_curve[2:]], abs=1e-6)

    wa, wb = load_file(a.model_dir / weights), load_file(b.model_dir / weights)
    assert wa.keys() == wb.keys() and wa
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == [1, 2, 3, 3, 4, 5]  # the log keeps the crashed run's lines and continues

    if lora:  # the noise is part of what has to be restored: without it the weights differ
        c = run_training(cfg_for(tmp_path / "c", data, *common, "noise.alpha=0"))
        wc = load_file(c.model_dir / weights)
        assert max((wa[k] - wc[k]).abs().max().item() for k in wa) > 1e-4


# -- atomic saves ------------------------------------------------------------------------------


def _previous_model(directory: Path) -> dict[str, bytes]:
    directory.mkdir(parents=True)
    files = {"model.safetensors": b"previous weights", "config.json": b'{"previous": true}'}
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return files


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _disk_full(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"half a fi")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "model.safetensors"))


def test_atomic_save_keeps_the_previous_directory_when_writing_fails(tmp_path):
    target = tmp_path / "model"
    before = _previous_model(target)
    with pytest.raises(OSError) as caught:
        atomic_save_dir(target, _disk_full)
    assert caught.value.errno == errno.ENOSPC
    assert _contents(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    atomic_save_dir(target, lambda tmp: (tmp / "model.safetensors").write_bytes(b"new"))
    assert _contents(target) == {"model.safetensors": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_save_restores_the_previous_directory_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "model"
    before = _previous_model(target)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".model.tmp-"):  # the old dir was moved aside; now the new one fails
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        atomic_save_dir(target, lambda tmp: (tmp / "model.safetensors").write_bytes(b"new"))
    assert calls[0][0] == "model"  # the failure really happened after the previous model was moved
    monkeypatch.setattr(os, "replace", real_replace)
    assert _contents(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_full_disk_while_saving_the_final_model(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    before = _previous_model(out / "model")
    import neftune.train

    monkeypatch.setattr(neftune.train, "_save", lambda model, tokenizer, directory, state=None: _disk_full(directory))
    rc = main(
        [
            "train",
            "--model",
            "tiny-random",
            "--data",
            str(data_dir / "alpaca.jsonl"),
            "--output",
            str(out),
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("neftune: error: "), err
    assert "No space left on device" in lines[0] and str(out / "model") in lines[0]
    assert "Traceback" not in err
    assert _contents(out / "model") == before
    assert leftovers(out) == []


# -- several processes -------------------------------------------------------------------------

DRIVER = textwrap.dedent(
    """
    # `python -m neftune` with the noise function wrapped to record, per rank, the seed of every draw
    import importlib, json, os, sys
    from neftune.cli import main

    attach_module = importlib.import_module("neftune.attach")  # `neftune.attach` is the function
    real = attach_module.noisy_embeddings
    draws = []

    def recording(embeddings, alpha, *, generator=None, **kwargs):
        draws.append(generator.initial_seed())
        out = real(embeddings, alpha, generator=generator, **kwargs)
        draws.append((out.float() - embeddings.float()).abs().max().item())
        return out

    attach_module.noisy_embeddings = recording
    code = main(sys.argv[1:])
    with open(os.path.join(os.environ["DRAWS_DIR"], f"rank{os.environ['RANK']}.json"), "w") as fh:
        json.dump({"draws": draws, "world": os.environ["WORLD_SIZE"]}, fh)
    sys.exit(code)
    """
)


def test_two_cpu_processes_with_torchrun(neftune_cache, data_dir, tmp_path):
    """torchrun, 2 processes, gloo: one model directory, and each rank draws its own noise."""
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [
        *launcher,
        "--standalone",
        "--nproc_per_node",
        "2",  # standalone: the rendezvous picks a free port itself
        str(driver),
        "train",
        "--model",
        "tiny-random",
        "--data",
        str(data_dir / "alpaca.jsonl"),
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "3",
        "--no-progress",
        "train.logging_steps=1",
    ]
    env = {**os.environ, **OFFLINE, "NEFTUNE_CACHE": str(neftune_cache), "DRAWS_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done: ") == 1  # only rank 0 reports ...
    assert (out / "model" / "adapter_model.safetensors").is_file()  # ... and writes the one model
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoints", "model", "tensorboard"]
    assert leftovers(out) == []
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["epoch"] == pytest.approx(1.0)  # 6 examples / (2 ranks x 3) per step

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == ["2", "2"]
    seeds = [set(r["draws"][0::2]) for r in ranks]
    assert all(len(s) == 2 for s in seeds)  # one draw per step, 2 steps, per rank
    assert not seeds[0] & seeds[1]  # the two ranks never share a noise stream
    assert all(m > 0 for r in ranks for m in r["draws"][1::2])


def test_ranks_draw_different_noise_for_the_same_batch(tiny_model, monkeypatch):
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    tiny_model.train()

    def noise_on(rank: str) -> torch.Tensor:
        monkeypatch.setenv("RANK", rank)
        with neftune.attach(tiny_model, alpha=5.0, seed=7) as handle, record_noise(tiny_model) as rec:
            assert handle.rank == int(rank)
            handle.set_step(3)
            tiny_model(input_ids=ids)
        return rec[0]["noise"]

    zero, one, zero_again = noise_on("0"), noise_on("1"), noise_on("0")
    assert torch.equal(zero, zero_again)
    assert not torch.allclose(zero, one)
    assert zero.abs().max() > 0 and one.abs().max() > 0


# -- the embedded default ----------------------------------------------------------------------


def _train_args_for(argv: list[str], tmp_path: Path):
    from neftune.cli import build_parser, config_from_args

    args, extra = build_parser().parse_known_args(["train", "--output", str(tmp_path / "o"), *argv])
    args.overrides = extra
    cfg = config_from_args(args, Config)
    return cfg, training_arguments(cfg, Path(cfg.train.output), has_eval=True)


def test_embedded_default_is_a_40_step_run_on_builtin_skills(tmp_path):
    assert get_preset("builtin:skills").default_steps == 40
    cfg, args = _train_args_for([], tmp_path)
    assert cfg.data.train == "builtin:skills" and cfg.model.name == "smollm2-135m"
    assert cfg.train.max_steps is None and cfg.train.epochs is None  # "not given" is not "1 epoch"
    assert args.max_steps == 40
    assert args.eval_strategy == "steps" and args.save_steps == 50 and args.learning_rate == pytest.approx(2e-4)
    assert args.per_device_train_batch_size == 8 and args.seed == 0 and args.data_seed == 0

    assert _train_args_for(["--max-steps", "7"], tmp_path)[1].max_steps == 7
    assert _train_args_for(["--full"], tmp_path)[1].learning_rate == pytest.approx(2e-5)


@pytest.mark.parametrize(
    ("argv", "max_steps", "epochs"),
    [
        ([], 40, 1.0),  # the preset's default budget
        (["--epochs", "1"], -1, 1.0),  # an explicit epoch is an epoch, not the preset's 60 steps
        (["train.epochs=1.0"], -1, 1.0),
        (["--epochs", "2"], -1, 2.0),
        (["--epochs", "0.5"], -1, 0.5),
        (["--max-steps", "7", "--epochs", "3"], 7, 3.0),  # steps win over epochs, as in transformers
        (["--data", "x.jsonl"], -1, 1.0),  # own data: one epoch
        (["--data", "builtin:sharegpt"], -1, 1.0),  # a preset without default steps: one epoch
    ],
)
def test_preset_steps_apply_only_when_neither_steps_nor_epochs_are_set(tmp_path, argv, max_steps, epochs):
    args = _train_args_for(argv, tmp_path)[1]
    assert (args.max_steps, args.num_train_epochs) == (max_steps, epochs)


def test_an_explicit_epoch_on_builtin_skills_trains_a_whole_epoch(tmp_path):
    """The steps transformers computes from one epoch of the data, not the preset's 60."""
    cfg = load_config(
        Config,
        None,
        [
            "model.name=tiny-random",
            f"train.output={tmp_path / 'out'}",
            "train.epochs=1",
            "data.limit=24",
            "data.eval_limit=2",
            "train.batch_size=8",
            "train.progress=false",
        ],
    )
    result = run_training(cfg)
    assert result.metrics["max_steps"] == 3  # 24 examples / 8 per step
