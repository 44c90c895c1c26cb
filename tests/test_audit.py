"""neftune audit: the effective alpha of transformers' built-in hook, by hand, against the hook, and from the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tests.helpers import record_noise

from neftune.audit import Audit, pack_lengths, run_audit, training_steps
from neftune.cli import main
from neftune.data import PaddingCollator, encode_examples, load_examples, packing_collator

D = 64


def test_effective_alpha_of_a_known_batch_by_hand():
    padded = Audit.from_steps([[10, 60, 30]], 5.0, "padded", 3)
    assert padded.effective.tolist() == pytest.approx([5 * math.sqrt(10 / 60), 5.0, 5 * math.sqrt(30 / 60)])
    assert padded.padding_tokens == 3 * 60 - 100
    packed = Audit.from_steps([[10, 60, 30]], 5.0, "packed", 3)
    assert packed.effective.tolist() == pytest.approx([5 * math.sqrt(0.1), 5 * math.sqrt(0.6), 5 * math.sqrt(0.3)])
    assert packed.padding_tokens == 0
    s = packed.summary()
    assert (s["min"], s["median"], s["max"]) == pytest.approx((1.5811, 2.7386, 3.8730), abs=1e-4)
    assert s["below_half"] == pytest.approx(1 / 3) and s["examples"] == 3
    two_steps = Audit.from_steps([[4, 4], [1, 9]], 2.0, "padded", 2)
    assert two_steps.effective.tolist() == pytest.approx([2.0, 2.0, 2 / 3, 2.0])
    text = two_steps.render()  # 26 tokens noised (2x4 + 2x9), 8 of them padding
    assert "below half the intended alpha (< 1): 25.0% of examples" in text
    assert "padding tokens noised: 8 (30.8% of noised tokens)" in text
    assert "0.3-0.4 |" in text and text.count("|") == 10


def test_audit_matches_the_builtin_hook_measured_on_the_real_collators(tiny_model):
    """What the audit reports is what transformers' hook does to batches from neftune's collators."""
    try:
        from transformers.integrations.neftune import neftune_post_forward_hook
    except ImportError:  # transformers before the hook moved to integrations (5.0)
        from transformers.trainer_utils import neftune_post_forward_hook

    lengths = [10, 60, 30, 17]
    g = torch.Generator().manual_seed(0)
    features = [{"input_ids": torch.randint(0, 250, (n,), generator=g).tolist()} for n in lengths]
    embedding = tiny_model.get_input_embeddings()
    embedding.neftune_noise_alpha = 5.0
    handle = embedding.register_forward_hook(neftune_post_forward_hook)
    tiny_model.train()
    with record_noise(tiny_model) as records:
        for collate in (PaddingCollator(259), packing_collator()):
            batch = collate(features)
            tiny_model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    padded, packed = records[0]["noise"], records[1]["noise"][0]
    starts = np.cumsum([0, *lengths[:-1]])
    for mode, measured in (
        ("padded", [padded[i, :n].abs().max().item() for i, n in enumerate(lengths)]),
        ("packed", [packed[s : s + n].abs().max().item() for s, n in zip(starts, lengths, strict=True)]),
    ):
        audit = Audit.from_steps([lengths], 5.0, mode, len(lengths))
        # the paper's magnitude for example i is 5/sqrt(L_i*d); the hook's, relative to it, is effective/alpha
        relative = [m * math.sqrt(n * D) / 5.0 for m, n in zip(measured, lengths, strict=True)]
        assert relative == pytest.approx((audit.effective / 5.0).tolist(), rel=0.05)


def test_training_steps_are_the_batches_a_trainer_draws(tiny_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    seen: list[list[int]] = []

    def collate(features):
        seen.append([f["i"] for f in features])
        return {
            "input_ids": torch.tensor([[1, 2, 3]] * len(features)),
            "labels": torch.tensor([[1, 2, 3]] * len(features)),
        }

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=5,
        num_train_epochs=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=7,
        remove_unused_columns=False,
        disable_tqdm=True,
        learning_rate=0.0,
    )
    Trainer(model=tiny_model, args=args, train_dataset=[{"i": i} for i in range(23)], data_collator=collate).train()
    assert seen == training_steps(23, 5, seed=7)
    assert sorted(i for step in seen for i in step) == list(range(23)) and len(seen[-1]) == 3


def test_trl_best_fit_packing_is_used_for_pack_length():
    assert pack_lengths([5, 3, 2, 7], 8) == [[7], [5, 3], [2]]  # TRL's documented example


def _write_alpaca(path, n=9):
    records = [
        {"instruction": "Say it " + "again " * (i * 3), "input": "", "output": "ok " * (i + 1)} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_cli_reports_the_hand_computed_effective_alpha(tmp_path, tiny_model_dir, tiny_tokenizer, capsys, mode):
    data = _write_alpaca(tmp_path / "train.jsonl")
    argv = ["audit", "--data", str(data), "--tokenizer", str(tiny_model_dir), f"--{mode}"]
    assert main([*argv, "--batch-size", "16", "--max-length", "200", "--alpha", "5"]) == 0
    out = capsys.readouterr().out
    # one batch holds every example, so T is the longest example (padded) or all of them (packed)
    rows, _ = encode_examples(tiny_tokenizer, load_examples(str(data)).examples, 200)
    lengths = np.array([len(r["input_ids"]) for r in rows], float)
    row = lengths.max() if mode == "padded" else lengths.sum()
    expected = 5 * np.sqrt(lengths / row)
    assert f"  min     {expected.min():7.3f}" in out
    assert f"  median  {np.median(expected):7.3f}" in out
    assert f"  max     {expected.max():7.3f}" in out
    assert f"{np.mean(expected < 2.5):.1%} of examples" in out
    assert f"{len(rows)} examples, {mode} batches of 16" in out


def test_pack_length_packs_before_batching(tmp_path, tiny_tokenizer):
    data = _write_alpaca(tmp_path / "train.jsonl")
    audit = run_audit(
        str(data), tiny_tokenizer, mode="packed", batch_size=1, max_length=200, alpha=5, pack_length=10_000
    )
    assert audit.row_lengths.tolist() == [audit.lengths.sum()] * len(audit.lengths)  # one sequence, one row
    small = run_audit(str(data), tiny_tokenizer, mode="packed", batch_size=1, max_length=200, alpha=5, pack_length=200)
    assert small.row_lengths.max() <= 200 and len(set(small.row_lengths.tolist())) > 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--padded", "--pack-length", "64"], "--pack-length needs --packed"),
        (["--packed", "--alpha", "0"], "alpha must be positive"),
        (["--packed", "--batch-size", "0"], "batch size must be at least 1"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, tiny_model_dir, capsys, extra, message):
    data = _write_alpaca(tmp_path / "train.jsonl")
    argv = ["audit", "--data", str(data), "--model", str(tiny_model_dir), "--batch-size", "4", "--max-length", "64"]
    argv += ["--alpha", "5", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("neftune: error: ") and message in err and err.count("\n") == 1


def test_missing_data_file_is_a_one_line_error(tmp_path, tiny_model_dir, capsys):
    argv = ["audit", "--data", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir), "--padded"]
    assert main([*argv, "--batch-size", "4", "--max-length", "64", "--alpha", "5"]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and err.count("\n") == 1
