"""NEFTune in TRL's DPOTrainer: the policy is noised per example, the reference never.

A tiny Llama with a LoRA adapter trains 2 DPO steps on generated preference pairs.  TRL computes
the reference log-probs with the same module, adapter disabled, inside its own ``use_adapter``
context; the tests wrap that context to know which forward is the reference (independently of
how neftune tells them apart) and observe the embeddings the first decoder layer receives.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import record_dpo_forwards, record_noise
from tests.test_patch import _env, _neftune_run

import neftune
from neftune import patch

ALPHA = 10.0
D = 64


@pytest.fixture(autouse=True)
def _unpatched():
    patch.unpatch_transformers()
    yield
    patch.unpatch_transformers()


def preference_pairs(n: int = 8) -> list[dict[str, str]]:
    """Pairs whose chosen and rejected answers differ a lot in length, so rows of one batch do too."""
    return [
        {
            "prompt": f"Question {i}: " + "why " * (i % 3),
            "chosen": "Because. " * (1 + i % 2),
            "rejected": "No idea at all, sorry. " * (2 + i % 4),
        }
        for i in range(n)
    ]


def _dpo(model, tokenizer, tmp_path, *, builtin_alpha=None, callbacks=(), ref_model=None) -> list[dict]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        per_device_train_batch_size=3,
        max_steps=2,
        learning_rate=1e-3,
        neftune_noise_alpha=builtin_alpha,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataset_num_proc=None,
    )
    peft_config = None if ref_model is not None else LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=Dataset.from_list(preference_pairs()),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )
    with record_dpo_forwards(trainer.model) as records:
        trainer.train()
    return records


def _per_example_ratios(record: dict, by_row_length: bool = False) -> list[tuple[int, float]]:
    """(L, max|noise| * sqrt(scale * d) / alpha) for each row; scale is L (the row's own length) or the padded T."""
    out = []
    for row, mask in enumerate(record["attention_mask"]):
        n, t = int(mask.sum()), mask.numel()
        peak = record["noise"][row, :n].abs().max().item()
        out.append((n, peak * math.sqrt((t if by_row_length else n) * D) / ALPHA))
    return out


def _ref_log_probs(records: list[dict]) -> list[torch.Tensor]:
    return [r["log_probs"] for r in records if r["reference"]]


@pytest.mark.parametrize("how", ["patch", "callback"])
def test_dpo_reference_is_never_noised_and_policy_rows_get_their_own_length(tiny_model, tiny_tokenizer, tmp_path, how):
    quiet = copy.deepcopy(tiny_model)
    if how == "patch":
        neftune.patch_transformers(quiet=True)
        noisy = _dpo(tiny_model, tiny_tokenizer, tmp_path, builtin_alpha=ALPHA)
        clean = _dpo(quiet, tiny_tokenizer, tmp_path, builtin_alpha=0.0)
    else:
        noisy = _dpo(tiny_model, tiny_tokenizer, tmp_path, callbacks=[neftune.NEFTuneCallback(alpha=ALPHA)])
        clean = _dpo(quiet, tiny_tokenizer, tmp_path, callbacks=[neftune.NEFTuneCallback(alpha=0.0)])

    reference = [r for r in noisy if r["reference"]]
    policy = [r for r in noisy if not r["reference"]]
    assert len(reference) == len(policy) == 2
    assert all(torch.count_nonzero(r["noise"]) == 0 for r in reference)
    ref_noisy, ref_clean = _ref_log_probs(noisy), _ref_log_probs(clean)
    assert len(ref_noisy) == len(ref_clean) == 2
    assert all(torch.equal(a, b) for a, b in zip(ref_noisy, ref_clean, strict=True))  # bit-identical

    lengths = set()
    for r in policy:
        batch = r["attention_mask"].shape[0]
        assert batch == 6  # 3 chosen rows, then their 3 rejected rows
        ratios = _per_example_ratios(r)
        assert all(0.9 < ratio <= 1 + 1e-5 for _, ratio in ratios), ratios
        assert torch.count_nonzero(r["noise"][r["attention_mask"] == 0]) == 0  # padding gets none
        lengths |= {n for n, _ in ratios}
        chosen, rejected = r["attention_mask"][: batch // 2].sum(1), r["attention_mask"][batch // 2 :].sum(1)
        assert bool((chosen < rejected).all())  # so chosen rows were scaled by lengths of their own
    assert len(lengths) >= 4


def test_dpo_under_transformers_hook_noises_the_reference(tiny_model, tiny_tokenizer, tmp_path):
    quiet = copy.deepcopy(tiny_model)
    noisy = _dpo(tiny_model, tiny_tokenizer, tmp_path, builtin_alpha=ALPHA)
    clean = _dpo(quiet, tiny_tokenizer, tmp_path, builtin_alpha=0.0)

    reference = [r for r in noisy if r["reference"]]
    assert len(reference) == 2 and all(torch.count_nonzero(r["noise"]) > 0 for r in reference)
    assert not any(torch.equal(a, b) for a, b in zip(_ref_log_probs(noisy), _ref_log_probs(clean), strict=True))
    for r in noisy:  # every row, chosen or rejected, gets the padded row's length
        ratios = _per_example_ratios(r, by_row_length=True)
        assert all(0.9 < ratio <= 1 + 1e-5 for _, ratio in ratios)
        assert any(n < r["attention_mask"].shape[1] / 2 for n, _ in ratios)


def test_dpo_with_a_separate_reference_model_noises_only_the_policy(tiny_model, tiny_tokenizer, tmp_path):
    ref_model = copy.deepcopy(tiny_model)
    with record_noise(ref_model) as ref_records:
        policy = _dpo(
            tiny_model, tiny_tokenizer, tmp_path, callbacks=[neftune.NEFTuneCallback(alpha=ALPHA)], ref_model=ref_model
        )
    assert len(policy) == 2 and not any(r["reference"] for r in policy)
    assert all(0.9 < ratio <= 1 + 1e-5 for r in policy for _, ratio in _per_example_ratios(r))
    assert len(ref_records) == 2 and all(torch.count_nonzero(r["noise"]) == 0 for r in ref_records)


def test_peft_adapter_state_decides_which_forward_is_noised(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("ref", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = torch.randint(0, 250, (2, 9))
    with neftune.attach(model, ALPHA, seed=0), record_noise(model) as records:
        model(input_ids=ids)
        with model.disable_adapter():
            model(input_ids=ids)
        model.set_adapter("ref")
        model(input_ids=ids)
        model.set_adapter("default")
        model.base_model.disable_adapter_layers()
        model(input_ids=ids)
        model.base_model.enable_adapter_layers()
        model(input_ids=ids)
    noised = [bool(torch.count_nonzero(r["noise"])) for r in records]
    assert noised == [True, False, False, False, True]


# The recorder the `trl dpo` child runs (chained from neftune's sitecustomize): once a NEFTune handle
# exists it marks TRL's reference forwards (its use_adapter context) and observes what reaches the model.
DPO_RECORDER = """
import contextlib, json, os
from neftune.attach import NEFTuneHandle

init = NEFTuneHandle.__init__

def recording_init(self, root, embedding, *args, **kwargs):
    init(self, root, embedding, *args, **kwargs)
    import trl.trainer.dpo_trainer as dpo_module
    if not getattr(dpo_module.use_adapter, "marked", False):
        original = dpo_module.use_adapter
        @contextlib.contextmanager
        def marked(*a, **k):
            os.environ["IN_REFERENCE"] = "1"
            try:
                with original(*a, **k):
                    yield
            finally:
                os.environ["IN_REFERENCE"] = "0"
        marked.marked = True
        dpo_module.use_adapter = marked
    seen = {}
    root.register_forward_pre_hook(lambda m, a, kw: seen.update(mask=kw.get("attention_mask")), with_kwargs=True)
    def observe(module, args, output):
        if not module.training:
            return
        ids, mask = args[0], seen["mask"]
        noise = (output - module.weight[ids]).detach()
        ratios = []
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            ratios.append(noise[r, :n].abs().max().item() * (n * noise.shape[-1]) ** 0.5 / self.alpha)
        record = {"reference": os.environ.get("IN_REFERENCE") == "1", "ratios": ratios}
        with open(os.environ["NEFTUNE_TEST_NOISE_LOG"], "a") as fh:
            fh.write(json.dumps(record) + "\\n")
    embedding.register_forward_hook(observe)

NEFTuneHandle.__init__ = recording_init
"""


@pytest.mark.slow
def test_trl_dpo_cli_with_peft_through_neftune_run_never_noises_the_reference(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preference_pairs()))
    log = tmp_path / "noise.jsonl"
    env = _env(tmp_path, DPO_RECORDER)
    env.update({"NEFTUNE_TEST_NOISE_LOG": str(log), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    env.update({"ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    command = [str(Path(sys.executable).parent / "trl"), "dpo", "--model_name_or_path", str(tiny_model_dir)]
    command += ["--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--neftune_noise_alpha", "10"]
    command += ["--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--per_device_train_batch_size", "2"]
    command += ["--max_steps", "2", "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--dtype", "float32"]
    command += ["--disable_tqdm", "true", "--seed", "0", "--gradient_checkpointing", "false"]
    proc = _neftune_run(command, env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    reference = [r for r in records if r["reference"]]
    policy = [r for r in records if not r["reference"]]
    assert len(reference) == len(policy) == 2
    assert all(ratio == 0 for r in reference for ratio in r["ratios"])
    assert all(0.9 < ratio <= 1 + 1e-5 for r in policy for ratio in r["ratios"])


def test_kto_reference_is_never_noised_and_its_policy_kl_forward_is(tiny_model, tiny_tokenizer, tmp_path):
    """KTO also runs the PEFT model as its own reference; its policy's KL forward runs without grad and is noised."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import KTOConfig, KTOTrainer

    rows = [
        {"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
        for p in preference_pairs()
        for key in ("chosen", "rejected")
    ]
    config = KTOConfig(
        output_dir=str(tmp_path / "kto"),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataset_num_proc=None,
    )
    trainer = KTOTrainer(
        model=tiny_model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        callbacks=[neftune.NEFTuneCallback(alpha=ALPHA)],
    )
    with record_dpo_forwards(trainer.model, "kto_trainer") as records:
        trainer.train()
    reference = [r for r in records if r["reference"]]
    policy = [r for r in records if not r["reference"]]
    assert len(reference) == len(policy) == 4  # per step: the main and the KL forward of each
    assert all(torch.count_nonzero(r["noise"]) == 0 for r in reference)
    assert sum(not r["grad"] for r in policy) == 2  # the policy's KL forwards run under no_grad, and are noised
    for r in policy:
        assert all(0.9 < ratio <= 1 + 1e-5 for _, ratio in _per_example_ratios(r)), _per_example_ratios(r)
