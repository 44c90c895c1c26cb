"""Vision-language models: only text positions are noised, and only text tokens count in L.

A tiny LLaVA (CLIP vision tower, Llama language model, 4 image tokens per 16x16 image) is built
in-process.  The noise is read at the language model's first decoder layer, against the same
forward without hooks, padded and packed (padding-free, position_ids restarting).
"""

from __future__ import annotations

import math

import pytest
import torch

import neftune

D = 64
IMAGE = 257
PAD = 259
ALPHA = 5.0
N_IMAGE = 4  # (16 / 8) ** 2 patches, CLS dropped


@pytest.fixture
def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=260,
        hidden_size=D,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config).float().train()


def _layer_input(model, **inputs) -> torch.Tensor:
    seen = []
    layer = model.model.language_model.layers[0]
    hook = layer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("hidden_states", a[0] if a else None).detach().clone()), with_kwargs=True
    )
    try:
        model(**inputs)
    finally:
        hook.remove()
    return seen[0]


def _example(text_before: int, text_after: int, g: torch.Generator) -> torch.Tensor:
    before = torch.randint(0, 250, (text_before,), generator=g)
    after = torch.randint(0, 250, (text_after,), generator=g)
    return torch.cat([before, torch.full((N_IMAGE,), IMAGE), after])


def _check(noise: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor, ids: torch.Tensor, segments) -> None:
    """segments: (row, start, end) of each example; its text tokens alone set the bound."""
    image = ids == IMAGE
    assert torch.equal(noisy[image], clean[image])  # image positions exactly untouched
    for row, start, end in segments:
        text = ~image[row, start:end]
        n_text = int(text.sum())
        bound = ALPHA / math.sqrt(n_text * D)
        peak = noise[row, start:end][text].abs().max().item()
        assert 0.9 * bound < peak <= bound * (1 + 1e-5), (n_text, peak / bound)


def test_padded_batch_noises_text_only_scaled_by_text_length(tiny_llava):
    with neftune.attach(tiny_llava, ALPHA, seed=0) as handle:
        assert handle.placeholder_ids == (IMAGE,)

    g = torch.Generator().manual_seed(0)
    rows = [_example(2, 3, g), _example(6, 20, g)]  # 5 and 26 text tokens, 4 image tokens each
    seq = max(len(r) for r in rows)
    ids = torch.full((2, seq), PAD)
    mask = torch.zeros(2, seq, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    clean = _layer_input(tiny_llava, **inputs)
    with neftune.attach(tiny_llava, ALPHA, seed=0):
        noisy = _layer_input(tiny_llava, **inputs)
    noise = noisy - clean
    _check(noise, clean, noisy, ids, [(i, 0, len(r)) for i, r in enumerate(rows)])
    assert torch.count_nonzero(noise[mask == 0]) == 0


def test_packed_row_noises_text_only_scaled_by_each_examples_text_length(tiny_llava):
    g = torch.Generator().manual_seed(1)
    examples = [_example(1, 3, g), _example(10, 12, g), _example(3, 2, g)]
    ids = torch.cat(examples)[None]
    position_ids = torch.cat([torch.arange(len(e)) for e in examples])[None]
    inputs = {"input_ids": ids, "position_ids": position_ids, "pixel_values": torch.randn(3, 3, 16, 16, generator=g)}
    clean = _layer_input(tiny_llava, **inputs)
    with neftune.attach(tiny_llava, ALPHA, seed=0):
        noisy = _layer_input(tiny_llava, **inputs)
    starts = [0, len(examples[0]), len(examples[0]) + len(examples[1])]
    _check(noisy - clean, clean, noisy, ids, [(0, s, s + len(e)) for s, e in zip(starts, examples, strict=True)])


def test_a_text_model_has_no_placeholders(tiny_model):
    with neftune.attach(tiny_model, ALPHA, seed=0) as handle:
        assert handle.placeholder_ids == ()


def test_transformers_hook_counts_the_image_tokens_in_the_row_length(tiny_llava):
    """The built-in hook scales every text token by the padded row length, image tokens included."""
    from transformers.integrations.neftune import activate_neftune

    g = torch.Generator().manual_seed(2)
    ids = _example(2, 3, g)[None]  # 5 text tokens, 4 image tokens
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 16, 16, generator=g)}
    clean = _layer_input(tiny_llava, **inputs)
    handle = activate_neftune(tiny_llava, ALPHA)
    try:
        noisy = _layer_input(tiny_llava, **inputs)
    finally:
        handle.remove()
    text = ids[0] != IMAGE
    peak = (noisy - clean)[0, text].abs().max().item()
    row_bound = ALPHA / math.sqrt(ids.shape[1] * D)  # 9 tokens, not the 5 text tokens
    assert 0.9 * row_bound < peak <= row_bound * (1 + 1e-5)
    assert peak < 0.8 * ALPHA / math.sqrt(int(text.sum()) * D)  # so text gets sqrt(5/9) = 0.75x the paper's noise
