"""The packed-row attention gives what each example gets on its own, logits and gradients."""

from __future__ import annotations

import pytest
import torch

from neftune import varlen

LENGTHS = [5, 30, 12, 1, 40]


def _model(kv_heads: int):
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).float().train()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_row_matches_each_example_alone(kv_heads):
    model = _model(kv_heads)
    ids = torch.randint(0, 250, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]

    reference_loss = 0.0
    reference_logits = []
    for s, n in zip(starts, LENGTHS, strict=False):
        out = model(input_ids=ids[:, s : s + n])
        reference_logits.append(out.logits)
    reference = torch.cat(reference_logits, dim=1)
    reference_loss = torch.nn.functional.cross_entropy(reference[0], ids[0])
    ref_grad = torch.autograd.grad(reference_loss, model.model.layers[0].self_attn.q_proj.weight)[0]

    model.set_attn_implementation(varlen.register())
    logits = model(input_ids=ids, position_ids=pos).logits
    loss = torch.nn.functional.cross_entropy(logits[0], ids[0])
    grad = torch.autograd.grad(loss, model.model.layers[0].self_attn.q_proj.weight)[0]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)


def test_padded_batches_and_single_sequences_fall_back_to_sdpa_exactly():
    model = _model(4).eval()
    ids = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, 13:] = 0
    with torch.no_grad():
        sdpa = model(input_ids=ids, attention_mask=mask).logits
        single = model(input_ids=ids[:1]).logits
        model.set_attn_implementation(varlen.register())
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, sdpa)
        assert torch.equal(model(input_ids=ids[:1]).logits, single)


def test_segment_index():
    index, valid = varlen.segment_index(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    assert valid.tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    assert index[valid].tolist() == [0, 1, 2, 3, 4, 5]
    assert varlen.segment_index(torch.arange(7)[None]) is None
