"""Scaled embeddings (Gemma 3: the module multiplies its rows by sqrt(d)): noise goes after the scale.

The paper adds alpha/sqrt(L*d) to what the first transformer block receives.  A tiny Gemma 3 text
model is built in-process; the noise is read at the first decoder layer's input against the
clean, scaled embeddings recomputed from the weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers import decoder_layers

import neftune
from neftune.attach import embedding_scale

D = 64
PAD = 259
ALPHA = 5.0


@pytest.fixture
def tiny_gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=260,
        hidden_size=D,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=16,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).float().train()


def _layer_input(model, **inputs) -> torch.Tensor:
    seen = []
    hook = decoder_layers(model)[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("hidden_states", a[0] if a else None).detach().clone()), with_kwargs=True
    )
    try:
        model(**inputs)
    finally:
        hook.remove()
    return seen[0]


def test_noise_is_added_after_gemmas_embedding_scale(tiny_gemma):
    embedding = tiny_gemma.get_input_embeddings()
    scale = embedding_scale(embedding)
    assert scale == pytest.approx(math.sqrt(D))

    lengths = [7, 30, 16]
    ids = torch.full((3, 30), PAD)
    mask = torch.zeros(3, 30, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(0, 250, (n,), generator=g)
        mask[row, :n] = 1
    clean = (embedding.weight[ids] * scale).detach()
    assert torch.allclose(_layer_input(tiny_gemma, input_ids=ids, attention_mask=mask), clean)  # no hook: scaled rows

    with neftune.attach(tiny_gemma, ALPHA, seed=0):
        noise = _layer_input(tiny_gemma, input_ids=ids, attention_mask=mask) - clean
    for row, n in enumerate(lengths):
        bound = ALPHA / math.sqrt(n * D)  # the paper's magnitude, on what the first block receives
        peak = noise[row, :n].abs().max().item()
        assert 0.9 * bound < peak <= bound * (1 + 1e-5), (n, peak / bound)
        assert torch.count_nonzero(noise[row, n:]) == 0
        # relative to the signal: per-token noise norm alpha/sqrt(3 L) against the scaled embeddings' norm
        ratio = noise[row, :n].norm(dim=-1).mean() / clean[row, :n].norm(dim=-1).mean()
        expected = ALPHA / math.sqrt(3 * n) / clean[row, :n].norm(dim=-1).mean()
        assert ratio == pytest.approx(expected.item(), rel=0.1)


def test_plain_embeddings_have_scale_one_and_peft_wrapped_ones_keep_theirs(tiny_model, tiny_gemma):
    from peft import LoraConfig, get_peft_model

    assert embedding_scale(tiny_model.get_input_embeddings()) == 1.0
    wrapped = get_peft_model(tiny_gemma, LoraConfig(r=2, target_modules=["embed_tokens"]))
    assert type(wrapped.get_input_embeddings()).__name__ != "Gemma3TextScaledWordEmbedding"
    assert embedding_scale(wrapped.get_input_embeddings()) == pytest.approx(math.sqrt(D))
    wrapped.train()
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(1))
    clean = tiny_gemma.model.embed_tokens.base_layer.weight[ids].detach() * math.sqrt(D)  # LoRA's B starts at 0
    with neftune.attach(wrapped, ALPHA, seed=0):
        noise = _layer_input(wrapped, input_ids=ids) - clean
    assert 0.9 < noise.abs().max().item() * math.sqrt(12 * D) / ALPHA <= 1 + 1e-5


def test_audit_reports_the_noise_relative_to_the_scaled_embedding_norm(tiny_gemma, tiny_tokenizer, tmp_path, capsys):
    import json

    import numpy as np

    from neftune.audit import run_audit
    from neftune.cli import main
    from neftune.data import encode_examples, load_examples

    model_dir = tmp_path / "gemma"
    tiny_gemma.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "a.jsonl"
    records = [{"instruction": "Say hi " * (1 + i), "output": "hi " * (2 + i)} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    audit = run_audit(
        str(data),
        tiny_tokenizer,
        mode="padded",
        batch_size=2,
        max_length=128,
        alpha=ALPHA,
        embedding_spec=str(model_dir),
    )
    rows, _ = encode_examples(tiny_tokenizer, load_examples(str(data)).examples, 128)
    ids = torch.tensor([t for r in rows for t in r["input_ids"]])
    expected_norm = (tiny_gemma.get_input_embeddings().weight[ids] * math.sqrt(D)).norm(dim=-1).mean().item()
    assert audit.embedding_scale == pytest.approx(math.sqrt(D))
    assert audit.embedding_norm == pytest.approx(expected_norm, rel=1e-5)
    ours = audit.relative_noise()
    assert ours is not None
    np.testing.assert_allclose(ours, ALPHA / np.sqrt(3 * audit.lengths) / expected_norm, rtol=1e-5)

    assert main(["audit", "--data", str(data), "--model", str(model_dir), "--padded", "--batch-size", "2",
                 "--max-length", "128", "--alpha", str(ALPHA)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "embedding (scale 8 inside the module, noise added after it)" in out
    assert f"neftune median {np.median(ours):.3g}" in out
