"""attach()/remove() on real (tiny) transformers models, PEFT and DDP wrappers."""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers import hook_count, record_noise
from torch import nn

import neftune
from neftune.tiny import build_tiny_model

D = 64  # tiny model width


def _padded_batch(lengths, seq=None, vocab=250, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = seq or max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def _bound(alpha, n):
    return alpha / math.sqrt(n * D)


def test_padded_batch_gets_per_example_noise(tiny_model):
    lengths = [5, 12, 40]
    ids, mask = _padded_batch(lengths)
    tiny_model.train()
    with neftune.attach(tiny_model, alpha=5.0, seed=0) as handle, record_noise(tiny_model) as rec:
        for step in range(30):
            handle.set_step(step)
            tiny_model(input_ids=ids, attention_mask=mask)
    noise = torch.stack([r["noise"] for r in rec])
    for i, n in enumerate(lengths):
        bound = _bound(5.0, n)
        assert noise[:, i, :n].abs().max() <= bound * (1 + 1e-6)
        assert noise[:, i, :n].abs().max() >= 0.99 * bound
        assert noise[:, i, :n].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.04)
        assert torch.count_nonzero(noise[:, i, n:]) == 0


def test_packed_row_gets_per_example_noise(tiny_model):
    lengths = [5, 12, 40]
    ids = torch.randint(0, 250, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    tiny_model.train()
    with neftune.attach(tiny_model, alpha=5.0, seed=0) as handle, record_noise(tiny_model) as rec:
        for step in range(30):
            handle.set_step(step)
            tiny_model(input_ids=ids, position_ids=pos)
    noise = torch.stack([r["noise"] for r in rec])[:, 0]
    start = 0
    for n in lengths:
        bound = _bound(5.0, n)
        seg = noise[:, start : start + n]
        assert seg.abs().max() <= bound * (1 + 1e-6) and seg.abs().max() >= 0.99 * bound
        start += n


def test_positional_attention_mask_is_seen(tiny_model):
    ids, mask = _padded_batch([3, 9])
    tiny_model.train()
    with neftune.attach(tiny_model, alpha=5.0), record_noise(tiny_model) as rec:
        tiny_model(ids, mask)
    assert torch.count_nonzero(rec[0]["noise"][0, 3:]) == 0
    assert rec[0]["noise"][0, :3].abs().max() <= _bound(5.0, 3) * (1 + 1e-6)


def test_eval_mode_and_after_remove_are_bit_identical_to_untouched(tiny_tokenizer):
    ids, mask = _padded_batch([7, 20])
    model = build_tiny_model(vocab_size=len(tiny_tokenizer), seed=1)
    untouched = build_tiny_model(vocab_size=len(tiny_tokenizer), seed=1)
    handle = neftune.attach(model, alpha=15.0)
    model.eval(), untouched.eval()
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, attention_mask=mask).logits, untouched(input_ids=ids, attention_mask=mask).logits
        )
    model.train(), untouched.train()
    with torch.no_grad():
        noisy = model(input_ids=ids, attention_mask=mask).logits
        clean = untouched(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(noisy, clean)  # the hook really was active in training mode
    handle.remove()
    handle.remove()  # idempotent
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, clean)
    assert hook_count(model) == hook_count(untouched)


def test_context_manager_removes_on_exception(tiny_model):
    before = hook_count(tiny_model)
    with pytest.raises(RuntimeError, match="boom"), neftune.attach(tiny_model, alpha=5.0):
        assert hook_count(tiny_model) > before
        raise RuntimeError("boom")
    assert hook_count(tiny_model) == before


def test_double_attach_raises(tiny_model):
    handle = neftune.attach(tiny_model, alpha=5.0)
    with pytest.raises(ValueError, match="already attached"):
        neftune.attach(tiny_model, alpha=5.0)
    handle.remove()
    neftune.attach(tiny_model, alpha=5.0).remove()  # fine again after removal


def test_attach_refuses_model_with_transformers_neftune_hook(tiny_model):
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    hf_handle = activate_neftune(tiny_model, 5.0)
    with pytest.raises(ValueError, match="transformers' own NEFTune hook"):
        neftune.attach(tiny_model, alpha=5.0)
    deactivate_neftune(tiny_model, hf_handle)


def test_gradient_reaches_embedding_weights(tiny_model):
    ids, mask = _padded_batch([6, 10])
    tiny_model.train()
    with neftune.attach(tiny_model, alpha=5.0):
        out = tiny_model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    grad = tiny_model.get_input_embeddings().weight.grad
    assert grad is not None and torch.count_nonzero(grad[ids[mask.bool()].unique()]) > 0


def test_same_seed_same_noise_and_ranks_differ(tiny_model, monkeypatch):
    ids, mask = _padded_batch([8, 8])
    tiny_model.train()

    def noise_for(seed):
        with neftune.attach(tiny_model, alpha=5.0, seed=seed), record_noise(tiny_model) as rec:
            tiny_model(input_ids=ids, attention_mask=mask)
        return rec[0]["noise"]

    a, b, c = noise_for(7), noise_for(7), noise_for(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    monkeypatch.setenv("RANK", "1")
    assert not torch.equal(noise_for(7), a)


def test_noise_depends_on_step_not_on_history(tiny_model):
    """Resuming at step N reproduces the noise of an uninterrupted run at step N."""
    ids, mask = _padded_batch([8, 8])
    tiny_model.train()
    with neftune.attach(tiny_model, alpha=5.0, seed=1) as h, record_noise(tiny_model) as rec:
        for step in range(3):
            h.set_step(step)
            tiny_model(input_ids=ids, attention_mask=mask)
    with neftune.attach(tiny_model, alpha=5.0, seed=1) as h, record_noise(tiny_model) as rec2:
        h.set_step(2)
        tiny_model(input_ids=ids, attention_mask=mask)
    assert torch.equal(rec[2]["noise"], rec2[0]["noise"])


def test_peft_lora_model(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, mask = _padded_batch([4, 16])
    model.train()
    with neftune.attach(model, alpha=5.0), record_noise(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    noise = rec[0]["noise"]
    assert torch.count_nonzero(noise[0, 4:]) == 0
    assert noise[0, :4].abs().max() <= _bound(5.0, 4) * (1 + 1e-6)
    assert noise[0, :4].abs().max() > 0.5 * _bound(5.0, 4)


def test_ddp_wrapped_model(tiny_model, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(tiny_model)
        ids, mask = _padded_batch([5, 11])
        ddp.train()
        with neftune.attach(ddp, alpha=5.0), record_noise(tiny_model) as rec:
            ddp(input_ids=ids, attention_mask=mask)
        noise = rec[0]["noise"]
        assert torch.count_nonzero(noise[0, 5:]) == 0
        assert noise[0, :5].abs().max() <= _bound(5.0, 5) * (1 + 1e-6)
        assert noise[0, :5].abs().max() > 0.5 * _bound(5.0, 5)
    finally:
        dist.destroy_process_group()


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, D)
        self.out = nn.Linear(D, 10)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.tok(input_ids))


def test_any_module_with_explicit_embedding():
    model = _Plain().train()
    ids = torch.randint(0, 10, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    seen = []
    with neftune.attach(model, alpha=5.0, embedding=model.tok):
        model.tok.register_forward_hook(lambda m, a, o: seen.append(o - m.weight[ids]))
        model(ids, attention_mask=mask)
    assert torch.count_nonzero(seen[0][0, 3:]) == 0 and seen[0][0, :3].abs().max() > 0


def test_module_without_input_embedding_is_a_clear_error():
    with pytest.raises(ValueError, match="pass embedding="):
        neftune.attach(nn.Linear(3, 3), alpha=5.0)


def test_non_float_embedding_output_is_a_type_error():
    class IntEmbed(nn.Module):
        def forward(self, ids):
            return ids

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = IntEmbed()

        def forward(self, ids):
            return self.e(ids)

    m = M().train()
    with neftune.attach(m, alpha=5.0, embedding=m.e), pytest.raises(TypeError, match="return a float tensor"):
        m(torch.zeros(1, 3, dtype=torch.long))
    assert hook_count(m) == 0


@pytest.mark.parametrize("alpha", [-5, float("nan"), float("inf")])
def test_attach_rejects_bad_alpha(tiny_model, alpha):
    with pytest.raises(ValueError, match="alpha"):
        neftune.attach(tiny_model, alpha=alpha)
