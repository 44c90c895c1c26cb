"""NEFTuneCallback inside transformers Trainer and TRL SFTTrainer, and the built-in hook side by side."""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers import decoder_layers, hook_count, record_noise
from transformers import Trainer, TrainerCallback, TrainingArguments

import neftune
from neftune import NEFTuneCallback

D = 64


def _args(tmp_path, **kw):
    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 3,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        "remove_unused_columns": False,
    }
    base.update(kw)
    return TrainingArguments(**base)


def _examples(lengths, vocab=250, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist()} for n in lengths]


def _pad_collate(features):
    seq = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), seq), 259)
    mask = torch.zeros(len(features), seq, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _check_rows(noise, mask, alpha):
    for i in range(noise.shape[0]):
        n = int(mask[i].sum())
        bound = alpha / math.sqrt(n * D)
        assert noise[i, :n].abs().max() <= bound * (1 + 1e-6)
        assert noise[i, :n].abs().max() > 0.5 * bound
        assert torch.count_nonzero(noise[i, n:]) == 0


def test_trainer_noise_in_training_none_in_evaluate(tiny_model, tmp_path):
    data = _examples([5, 12, 40, 7, 30, 9])
    before = hook_count(tiny_model)
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        data_collator=_pad_collate,
        callbacks=[NEFTuneCallback(alpha=5.0)],
    )
    with record_noise(tiny_model) as rec:
        trainer.train()
        n_train = len(rec)
        trainer.evaluate()
    train_rec, eval_rec = rec[:n_train], rec[n_train:]
    assert n_train == 4 and all(r["training"] for r in train_rec)
    for r in train_rec:
        mask = (r["input_ids"] != 259).long()
        _check_rows(r["noise"], mask, 5.0)
    assert eval_rec and all(torch.count_nonzero(r["noise"]) == 0 for r in eval_rec)
    assert hook_count(tiny_model) == before


class _Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("boom at step 2")


def test_no_hook_remains_after_train_raises(tiny_model, tmp_path):
    before = hook_count(tiny_model)
    cb = NEFTuneCallback(alpha=5.0)
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path),
        train_dataset=_examples([5, 9, 13] * 3),
        data_collator=_pad_collate,
        callbacks=[cb, _Boom()],
    )
    with pytest.raises(RuntimeError, match="boom at step 2"):
        trainer.train()
    assert hook_count(tiny_model) == before
    assert cb.handle is None


class _HookCounts(TrainerCallback):
    """Counts the model's hooks at the Trainer's events (registered after NEFTuneCallback)."""

    def __init__(self):
        self.seen: dict[str, set[int]] = {}

    def _note(self, event, kwargs):
        self.seen.setdefault(event, set()).add(hook_count(kwargs["model"]))

    def on_step_begin(self, args, state, control, **kwargs):
        self._note("step_begin", kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._note("pre_optimizer_step", kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        self._note("step_end", kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        self._note("evaluate", kwargs)

    def on_save(self, args, state, control, **kwargs):
        self._note("save", kwargs)


def test_hooks_live_only_inside_each_step(tiny_model, tmp_path):
    before = hook_count(tiny_model)
    counts = _HookCounts()
    data = _examples([5, 12, 40, 7, 30, 9])
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=data,
        eval_dataset=data,
        data_collator=_pad_collate,
        callbacks=[NEFTuneCallback(alpha=5.0), counts],
    )
    trainer.train()
    assert counts.seen["step_begin"] == {before + 3}  # pre-hook and release hook on the model, noise hook
    for event in ("pre_optimizer_step", "step_end", "evaluate", "save"):
        assert counts.seen[event] == {before}, event
    assert hook_count(tiny_model) == before


class _FailingForward:
    """A forward pre-hook on the first decoder layer that raises on the ``at``-th training forward."""

    def __init__(self, model, at: int):
        self.calls, self.at = 0, at
        self.handle = decoder_layers(model)[0].register_forward_pre_hook(self)

    def __call__(self, module, args):
        if module.training:
            self.calls += 1
            if self.calls == self.at:
                raise RuntimeError("out of memory in forward")


def test_an_exception_inside_a_forward_pass(tiny_model, tmp_path):
    before = hook_count(tiny_model)
    data = _examples([5, 9, 13] * 3)
    cb = NEFTuneCallback(alpha=5.0)
    failing = _FailingForward(tiny_model, at=2)
    trainer = Trainer(
        model=tiny_model, args=_args(tmp_path), train_dataset=data, data_collator=_pad_collate, callbacks=[cb]
    )
    with pytest.raises(RuntimeError, match="out of memory in forward"), cb:  # the callback as a context manager
        trainer.train()
    assert cb.handle is None and hook_count(tiny_model) == before + 1  # only the failing test hook is left

    # without the context manager the step's hooks stay until the next train(), which neither
    # refuses to attach nor doubles the noise
    failing.calls, failing.at = 0, 3
    with pytest.raises(RuntimeError, match="out of memory in forward"):
        trainer.train()
    assert hook_count(tiny_model) == before + 1 + 3
    failing.handle.remove()
    with record_noise(tiny_model) as rec:
        trainer.train()
    assert len(rec) == 4 and all(r["training"] for r in rec)
    for r in rec:
        _check_rows(r["noise"], (r["input_ids"] != 259).long(), 5.0)
    assert hook_count(tiny_model) == before and cb.handle is None


def test_callback_refuses_to_double_transformers_builtin_noise(tiny_model, tmp_path):
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path, neftune_noise_alpha=5.0),
        train_dataset=_examples([5, 9, 13]),
        data_collator=_pad_collate,
        callbacks=[NEFTuneCallback(alpha=5.0)],
    )
    with pytest.raises(ValueError, match="transformers' own NEFTune hook"):
        trainer.train()


def test_trl_sft_trainer_packing_gets_per_example_magnitudes(tiny_model, tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    lengths = [5, 12, 40, 7, 30, 9]
    ds = Dataset.from_list(_examples(lengths))
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        packing=True,
        max_length=128,
        per_device_train_batch_size=3,
        max_steps=2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=tiny_model,
        args=config,
        train_dataset=ds,
        processing_class=tiny_tokenizer,
        callbacks=[NEFTuneCallback(alpha=5.0)],
    )
    with record_noise(tiny_model) as rec:
        trainer.train()
    assert rec
    seen_lengths = []
    for r in rec:
        assert r["noise"].shape[0] == 1  # padding-free: one packed row per batch
        ids = r["input_ids"][0].tolist()
        # recover segments from the known examples: packing keeps each example contiguous
        noise = r["noise"][0]
        start = 0
        while start < len(ids):
            n = next(n for n in lengths if ids[start : start + n] == _examples(lengths)[lengths.index(n)]["input_ids"])
            bound = 5.0 / math.sqrt(n * D)
            seg = noise[start : start + n]
            assert seg.abs().max() <= bound * (1 + 1e-6) and seg.abs().max() > 0.5 * bound
            seen_lengths.append(n)
            start += n
    assert len(seen_lengths) >= 4


def test_transformers_builtin_hook_uses_padded_and_packed_length(tiny_model):
    """The difference we claim: the built-in hook scales by the row length, not the example's."""
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    lengths = [10, 60, 30]
    ids = torch.randint(0, 250, (3, 60))
    mask = torch.zeros(3, 60, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    packed_ids = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None]
    packed_pos = torch.cat([torch.arange(n) for n in lengths])[None]
    tiny_model.train()

    def max_noise_per_example(attach_fn, detach_fn):
        out = {"padded": [], "packed": []}
        handle = attach_fn()
        with record_noise(tiny_model) as rec:
            for _ in range(10):
                tiny_model(input_ids=ids, attention_mask=mask)
                tiny_model(input_ids=packed_ids, position_ids=packed_pos)
        detach_fn(handle)
        padded = torch.stack([r["noise"] for r in rec[0::2]])
        packed = torch.stack([r["noise"] for r in rec[1::2]])[:, 0]
        starts = [0, 10, 70]
        for i, n in enumerate(lengths):
            out["padded"].append(padded[:, i, :n].abs().max().item())
            out["packed"].append(packed[:, starts[i] : starts[i] + n].abs().max().item())
        return out

    builtin = max_noise_per_example(
        lambda: activate_neftune(tiny_model, 5.0), lambda h: deactivate_neftune(tiny_model, h)
    )
    ours = max_noise_per_example(lambda: neftune.attach(tiny_model, 5.0, seed=0), lambda h: h.remove())
    for i, n in enumerate(lengths):
        assert builtin["padded"][i] == pytest.approx(5 / math.sqrt(60 * D), rel=0.01)
        assert builtin["packed"][i] == pytest.approx(5 / math.sqrt(100 * D), rel=0.01)
        assert ours["padded"][i] == pytest.approx(5 / math.sqrt(n * D), rel=0.01)
        assert ours["packed"][i] == pytest.approx(5 / math.sqrt(n * D), rel=0.01)
    # the shortest example gets sqrt(10/100) = 0.316x the paper's magnitude when packed by the built-in hook
    assert builtin["packed"][0] / ours["packed"][0] == pytest.approx(math.sqrt(10 / 100), rel=0.01)
