"""The labelled-only chunked loss equals the model's own loss and gradients, and refuses what it cannot do."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import neftune
from neftune import lmhead
from neftune.config import Config, load_config
from neftune.data.collate import PaddingCollator, packing_collator
from neftune.errors import ConfigError, ModelError
from neftune.train import run_training

LENGTHS = [(6, 9), (3, 14), (11, 5), (2, 1), (7, 12)]  # (prompt, answer) tokens per example


def make_model(vocab: int = 300, tied: bool = False, seed: int = 0, **config: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        use_cache=False,
        attn_implementation="sdpa",
        **config,
    )
    return LlamaForCausalLM(cfg).float().train()


def make_rows(vocab: int = 300, seed: int = 1) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_prompt, n_answer in LENGTHS:
        ids = torch.randint(0, vocab, (n_prompt + n_answer,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return rows


def batch_of(rows: list[dict], packed: bool) -> dict[str, torch.Tensor]:
    return packing_collator()(rows) if packed else PaddingCollator(pad_token_id=0)(rows)


def wrap(model: nn.Module, lora: bool) -> nn.Module:
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


def loss_and_grads(model: nn.Module, batch: dict, alpha: float, labelled: bool, **extra: object):
    """One training forward/backward; NEFTune attached afresh with a fixed seed, so both paths draw the same noise."""
    handle = lmhead.attach(model) if labelled else None
    noise = neftune.attach(model, alpha=alpha, seed=7) if alpha else None
    try:
        loss = model(**batch, **extra).loss
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)
    finally:
        for h in (noise, handle):
            if h is not None:
                h.remove()
    return loss.detach(), grads


@pytest.mark.parametrize("alpha", [0.0, 5.0], ids=["plain", "neftune"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-tied"])
def test_loss_and_gradients_equal_the_models_own(lora, packed, alpha):
    model = wrap(make_model(tied=not lora), lora)
    batch = batch_of(make_rows(), packed)
    ref_loss, ref_grads = loss_and_grads(model, batch, alpha, labelled=False)
    loss, grads = loss_and_grads(model, batch, alpha, labelled=True)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-5)
    assert len(grads) == len(ref_grads) > 0
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    # num_items_in_batch (the Trainer's count over a whole accumulated step) divides the summed loss
    n = torch.tensor(100)
    ref_sum, _ = loss_and_grads(model, batch, alpha, labelled=False, num_items_in_batch=n)
    ours_sum, _ = loss_and_grads(model, batch, alpha, labelled=True, num_items_in_batch=n)
    assert ours_sum.item() == pytest.approx(ref_sum.item(), rel=1e-5)


def test_a_packed_row_never_predicts_across_examples():
    """The packed loss is the labelled tokens' loss of each example run alone (no last->first prediction)."""
    model = make_model().eval()
    rows = make_rows()
    with lmhead.attach(model), torch.no_grad():
        packed = model(**batch_of(rows, packed=True)).loss
        total, count = 0.0, 0
        for row in rows:
            labels = torch.tensor([row["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            total += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * n
            count += n
    assert packed.item() == pytest.approx(total / count, rel=1e-5)


def test_chunked_linear_cross_entropy_with_bias_matches_torch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    ours = lmhead.linear_cross_entropy_sum(hidden, weight, targets, bias, chunk_rows=8)  # 5 chunks, a ragged last
    ref = nn.functional.cross_entropy(nn.functional.linear(hidden, weight, bias), targets, reduction="sum")
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(
        torch.autograd.grad(2 * ours, [hidden, weight, bias]),
        torch.autograd.grad(2 * ref, [hidden, weight, bias]),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_trainer_with_gradient_accumulation_trains_exactly_like_the_models_loss(tmp_path):
    """Two micro-batches per optimizer step: num_items_in_batch normalises both paths identically."""
    rows = make_rows() * 2
    params = {}
    for labelled in (False, True):
        model = make_model()
        handle = lmhead.attach(model) if labelled else None
        args = TrainingArguments(
            output_dir=str(tmp_path / str(labelled)),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=0.5,
            optim="sgd",
            lr_scheduler_type="constant",
            train_sampling_strategy="sequential",
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=packing_collator()
        )
        assert trainer.model_accepts_loss_kwargs  # so the Trainer passes num_items_in_batch to the forward
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        params[labelled] = (torch.cat([p.detach().flatten() for p in model.parameters()]), losses, trainer.evaluate())
        if handle is not None:
            handle.remove()
    (ref, ref_losses, ref_eval), (ours, losses, ours_eval) = params[False], params[True]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert ours_eval["eval_loss"] == pytest.approx(ref_eval["eval_loss"], rel=1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    initial = torch.cat([p.detach().flatten() for p in make_model().parameters()])
    assert (ref - initial).abs().max() > 1e-3  # the runs did train


def test_no_logits_tensor_of_vocabulary_width_is_kept_for_backward():
    """Bytes saved for backward at a 32K vocabulary: the labelled loss keeps 1/4 or less of the model's."""
    model = make_model(vocab=32000)
    batch = batch_of(make_rows(vocab=32000) * 8, packed=True)

    def saved_bytes(labelled: bool) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        handle = lmhead.attach(model) if labelled else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch).loss.backward()
        if handle is not None:
            handle.remove()
        return total

    full, ours = saved_bytes(False), saved_bytes(True)
    tokens = batch["input_ids"].numel()
    assert full > tokens * 32000 * 4  # the model keeps at least one fp32 logits tensor
    assert ours * 4 <= full


def test_without_labels_and_after_remove_the_model_is_untouched():
    model = make_model().eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        handle = lmhead.attach(model)
        during = model(input_ids=ids).logits
        with_labels = model(input_ids=ids, labels=ids)
        handle.remove()
        handle.remove()  # idempotent
        after = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    assert with_labels.get("logits") is None and with_labels.loss is not None
    assert after.logits.shape == (2, 9, 300) and not handle.attached
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


class ScaledLogits(LlamaForCausalLM):
    """A model that changes its logits after the head, which the config does not say."""

    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):  # type: ignore[override]
        out = super().forward(input_ids=input_ids, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_refusals_are_loud():
    with pytest.raises(ModelError, match="final_logit_softcapping"):
        lmhead.attach(make_model(final_logit_softcapping=30.0))
    from peft import LoraConfig, get_peft_model

    head_lora = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ModelError, match=r"plain nn\.Linear"):
        lmhead.attach(head_lora)
    model = make_model()
    handle = lmhead.attach(model)
    with pytest.raises(ModelError, match="already attached"):
        lmhead.attach(model)
    with pytest.raises(ModelError, match="by keyword"):
        model(torch.zeros(1, 4, dtype=torch.long), None, None, None, None, torch.zeros(1, 4, dtype=torch.long))
    handle.remove()

    scaled = ScaledLogits(make_model().config)
    with lmhead.attach(scaled), pytest.raises(ModelError, match="changes the logits after the head"):
        scaled(**batch_of(make_rows(), packed=True))

    class NoKeep(nn.Module):
        def forward(self, input_ids=None, labels=None, **kwargs):
            return input_ids

    with pytest.raises(ModelError, match="logits_to_keep"):
        lmhead.attach(NoKeep())


def test_the_setting(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert lmhead.loss_wanted("auto") is (not torch.cuda.is_available())
    assert lmhead.loss_wanted("labelled") and not lmhead.loss_wanted("full")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not lmhead.loss_wanted("auto")
    with pytest.raises(ConfigError, match="FSDP"):
        lmhead.loss_wanted("labelled")
    with pytest.raises(ConfigError, match=r"train\.loss"):
        load_config(Config, None, ["train.loss=fused"]).validate()


def test_neftune_train_gives_the_same_run_with_either_loss(tmp_path, tiny_model_dir):
    data = tmp_path / "alpaca.jsonl"
    records = [{"instruction": f"Repeat {w}", "output": w * 3} for w in ("ab", "cde", "f", "ghij", "k", "lm")]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = {}
    for loss in ("full", "labelled"):
        cfg = load_config(
            Config,
            None,
            [
                f"model.name={tiny_model_dir}",
                f"data.train={data}",
                f"data.eval={data}",
                f"train.output={tmp_path / loss}",
                "train.max_steps=3",
                "train.batch_size=3",
                "train.grad_accum=2",
                "train.logging_steps=1",
                "train.eval_steps=2",
                "train.progress=false",
                "train.lr=1e-2",
                f"train.loss={loss}",
            ],
        )
        result = run_training(cfg, keep_model=True)
        assert result.model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] > 0  # hooks are gone
        results[loss] = result
    full, ours = results["full"], results["labelled"]
    assert [s for s, _ in ours.loss_curve] == [s for s, _ in full.loss_curve] == [1, 2, 3]
    assert [v for _, v in ours.loss_curve] == pytest.approx([v for _, v in full.loss_curve], rel=1e-4)
    assert ours.metrics["heldout_loss"] == pytest.approx(full.metrics["heldout_loss"], rel=1e-4)
