"""Reference-free and reference-based metrics for generated answers, and held-out loss.

Typical use::

    from neftune.evaluate import evaluate_outputs, heldout_loss
    from neftune.outputs import read_outputs

    report = evaluate_outputs(read_outputs("runs/b/outputs.json"), examples, tokenizer)
    loss = heldout_loss(model, tokenizer, examples, max_length=1024, batch_size=8)

Text metrics work on whitespace tokens, lower-cased, so they need no tokenizer and are comparable
across models with different vocabularies:

* :func:`distinct_n` -- diversity across the whole set of answers;
* :func:`repetition_rate` -- degenerate looping inside an answer (what NEFTune is sometimes said to
  cause or cure);
* :func:`rouge_l` -- overlap with a reference answer;
* :func:`exact_match` -- the builtin skills' checkable answers, via
  :func:`neftune.data.builtin.check_answer`;
* IFEval accuracy -- verifiable instructions (``builtin:ifeval``), via :func:`neftune.ifeval.score_ifeval`;
* :func:`length_stats` -- answer lengths, which matter because LLM judges favour longer answers.

:func:`evaluate_outputs` scores one outputs file (what ``neftune eval`` writes); :func:`arm_scores` reads
from that the numbers an experiment arm records, under the keys of the metric registry
(:mod:`neftune.metrics`).

:func:`heldout_loss` is the mean cross-entropy per reference assistant token of held-out examples, with
the model in eval mode (NEFTune noise is only ever added in training mode); :func:`labelled_loss`,
which it calls, is the one definition of held-out loss that training, ``neftune eval`` and
``neftune compare`` share.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from neftune.errors import DataError
from neftune.ifeval import is_ifeval_example, score_ifeval
from neftune.metrics import arm_metrics
from neftune.outputs import REACHED_CAP, instruction_of

__all__ = [
    "arm_scores",
    "correct_flags",
    "distinct_n",
    "evaluate_outputs",
    "exact_match",
    "heldout_loss",
    "labelled_loss",
    "length_stats",
    "pad_token_id",
    "repetition_rate",
    "rouge_l",
    "words",
]


def words(text: str) -> list[str]:
    """Split ``text`` into lower-cased whitespace tokens (the unit of every text metric here)."""
    return text.lower().split()


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n: unique n-grams over all n-grams, pooled across ``texts``.

    An n-gram never spans two texts.  Returns 0.0 when there are no n-grams at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        grams = _ngrams(words(text), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Mean within-answer share of repeated n-grams (default 4-grams).

    For one text with ``T`` n-grams of which ``U`` are distinct, the share is ``1 - U / T``: the
    fraction of n-gram occurrences that repeat an earlier one in the same text (0 for no repetition,
    close to 1 for an answer stuck in a loop).  The result averages this over the texts that have at
    least one n-gram (texts shorter than ``n`` words cannot repeat and are left out); 0.0 if none do.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shares = []
    for text in texts:
        grams = _ngrams(words(text), n)
        if grams:
            shares.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(shares)) if shares else 0.0


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    # Classic dynamic programme kept to two rows: O(len(a) * len(b)) time, O(len(b)) memory.
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0] * (len(b) + 1)
        for j, other in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 between ``pred`` and ``ref``: longest common subsequence of words.

    precision = LCS / len(pred), recall = LCS / len(ref), F1 their harmonic mean.  Words are
    lower-cased whitespace tokens; returns 0.0 if either text is empty.
    """
    p, r = words(pred), words(ref)
    if not p or not r:
        return 0.0
    lcs = _lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _summary(values: Sequence[int]) -> dict[str, Any]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "min": 0, "max": 0, "values": []}
    array = np.asarray(values, dtype=float)
    return {
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "p90": float(np.percentile(array, 90)),
        "min": int(array.min()),
        "max": int(array.max()),
        "values": [int(v) for v in values],
    }


def length_stats(texts: Sequence[str], tokenizer: Any | None = None) -> dict[str, Any]:
    """Length distribution of ``texts`` in characters and, with a tokenizer, in tokens.

    Returns ``{"n", "empty", "chars": {...}, "tokens": {...} | None}`` where each summary holds
    ``mean``, ``median``, ``p90``, ``min``, ``max`` and ``values`` (the per-text lengths, in input
    order, for histograms).  ``empty`` counts answers that are blank after stripping.  Tokens are
    counted without special tokens.
    """
    chars = [len(t) for t in texts]
    tokens = None
    if tokenizer is not None:
        tokens = _summary([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts])
    return {
        "n": len(texts),
        "empty": sum(1 for t in texts if not t.strip()),
        "chars": _summary(chars),
        "tokens": tokens,
    }


def _has_answer(example: Any) -> bool:
    return (getattr(example, "meta", None) or {}).get("answer") is not None


def correct_flags(outputs: Sequence[str], examples: Sequence[Any]) -> list[bool | None]:
    """Per output: whether it states its example's ``meta["answer"]``; ``None`` if there is none.

    Checked by :func:`neftune.data.builtin.check_example` (which honours ``meta["case_sensitive"]``).
    """
    from neftune.data.builtin import check_example

    if len(outputs) != len(examples):
        raise DataError(f"exact match: {len(outputs)} outputs for {len(examples)} examples")
    return [bool(check_example(e, o)) if _has_answer(e) else None for o, e in zip(outputs, examples, strict=False)]


def exact_match(outputs: Sequence[str], examples: Sequence[Any]) -> dict[str, Any]:
    """Share of answers that are correct (:func:`correct_flags`), overall and per family.

    Only examples whose ``meta`` has an ``"answer"`` are scored; the family is ``meta["family"]``
    (``"unknown"`` when absent).  Returns ``{"accuracy", "correct", "n", "per_family": {family:
    {"accuracy", "correct", "n"}}}``; accuracy is ``None`` when nothing was scorable.
    """
    flags = correct_flags(outputs, examples)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for flag, example in zip(flags, examples, strict=False):
        if flag is None:
            continue
        family = str(example.meta.get("family", "unknown"))
        tally[family][0] += int(flag)
        tally[family][1] += 1

    def block(correct: int, n: int) -> dict[str, Any]:
        return {"accuracy": correct / n if n else None, "correct": correct, "n": n}

    correct = sum(c for c, _ in tally.values())
    n = sum(k for _, k in tally.values())
    result = block(correct, n)
    result["per_family"] = {family: block(*tally[family]) for family in sorted(tally)}
    return result


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's padding id (its eos, else 0, when it declares none)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def labelled_loss(
    model: Any, features: Sequence[Mapping[str, Sequence[int]]], *, pad_id: int, batch_size: int
) -> dict[str, Any]:
    """The held-out loss: mean cross-entropy per labelled token of already-encoded ``features``.

    This is the one definition of held-out loss in neftune: training's evaluations
    (``metrics.jsonl``, ``train_summary.json``), ``neftune eval`` and ``neftune compare`` all
    compute it here.  Each feature holds ``input_ids`` and ``labels`` (-100 where no loss is taken,
    as :func:`neftune.data.template.encode_examples` makes them).  Features are batched by length
    with right padding and scored with the model in eval mode (no NEFTune noise) under
    ``torch.inference_mode()``; the model's previous mode is restored afterwards.  The negative
    log-likelihood is summed over all labelled tokens and divided once by their count, so every
    token weighs the same whatever its example or batch (a mean of per-batch means would not).

    Returns ``{"loss", "perplexity", "tokens", "examples"}``.  Raises :class:`DataError` if no
    labelled token is left to score.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features = [f for f in features if any(label != -100 for label in f["labels"])]
    if not features:
        raise DataError("held-out loss: no assistant tokens to score (all examples empty or truncated away)")
    from neftune.generate import model_device

    device = model_device(model)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]), reverse=True)
    total_nll = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = [features[i] for i in order[start : start + batch_size]]
                nll, tokens = _batch_nll(model, batch, pad_id, device)
                total_nll += nll
                total_tokens += tokens
    finally:
        if was_training:
            model.train()
    if total_tokens == 0:
        raise DataError("held-out loss: no assistant tokens to score (all examples empty or truncated away)")
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_tokens, "examples": len(features)}


def _batch_nll(model: Any, batch: Sequence[Mapping[str, Sequence[int]]], pad_id: int, device: Any) -> tuple[float, int]:
    """Summed next-token NLL over the labelled positions of one right-padded batch, and their count."""
    width = max(len(f["input_ids"]) for f in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, feature in enumerate(batch):
        length = len(feature["input_ids"])
        input_ids[row, :length] = torch.tensor(list(feature["input_ids"]), dtype=torch.long)
        labels[row, :length] = torch.tensor(list(feature["labels"]), dtype=torch.long)
        attention_mask[row, :length] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    # Position t predicts token t+1; upcast so bf16/fp16 models give a stable sum.
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(nll), int((shift_labels != -100).sum())


def heldout_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    max_length: int,
    batch_size: int,
) -> dict[str, Any]:
    """:func:`labelled_loss` of ``examples`` encoded as for training (nats per assistant token).

    Examples are encoded by :func:`neftune.data.template.encode_examples` exactly as for training
    (prompt tokens are masked, only assistant tokens carry labels).  Returns ``{"loss",
    "perplexity", "tokens", "examples", "encode_stats"}`` where ``encode_stats`` is the counter
    returned by ``encode_examples`` (e.g. how many examples were dropped or truncated).  Raises
    :class:`DataError` if no assistant token is left to score.
    """
    from neftune.data.template import encode_examples

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features, stats = encode_examples(tokenizer, examples, max_length)
    result = labelled_loss(model, features, pad_id=pad_token_id(tokenizer), batch_size=batch_size)
    result["encode_stats"] = dict(stats)
    return result


def evaluate_outputs(
    records: Sequence[Mapping[str, Any]],
    examples: Sequence[Any] | None = None,
    tokenizer: Any | None = None,
) -> dict[str, Any]:
    """Every applicable metric for one outputs file.

    Args:
        records: AlpacaEval records (see :func:`neftune.outputs.read_outputs`).
        examples: the examples the records answer, in the same order; needed for exact match
            (examples whose ``meta`` carries an ``"answer"``) and used for references that the
            records lack.  Their last user message must equal each record's ``instruction``.
        tokenizer: optional, adds token lengths.

    Returns a dict with ``n``, ``lengths`` (:func:`length_stats`), ``distinct_1``, ``distinct_2``,
    ``repetition_4`` (:func:`repetition_rate` with 4-grams), ``exact_match`` (only when some example
    has an answer), ``rouge_l`` (``{"mean", "n"}``, only when some record or example has a
    reference; the mean is over those that do) and ``per_example``: ``{"length_chars": [int],
    "correct": [bool | None] | None, "rouge_l": [float | None] | None}`` aligned with ``records``
    (``None`` entries where an example has no answer or reference; ``None`` lists when none has),
    for paired comparisons between runs.  When some record says whether its answer reached the token cap
    (``reached_cap``, written by :func:`neftune.generate.generate_outputs`) the result has
    ``reached_cap``: ``{"share", "n"}`` over the records that say, and ``per_example["reached_cap"]``
    (0/1, ``None`` where a record does not say).  When some example carries IFEval instructions
    (``meta["instruction_id_list"]``, as in ``builtin:ifeval``) it also has ``ifeval``: prompt- and
    instruction-level accuracy, strict and loose, per family (:func:`neftune.ifeval.score_ifeval`),
    and ``per_example`` gains ``ifeval_prompt_strict`` and ``ifeval_prompt_loose`` (0/1) and the
    per-instruction verdicts.
    """
    outputs = [str(r["output"]) for r in records]
    if examples is not None:
        if len(examples) != len(records):
            raise DataError(f"{len(records)} output records but {len(examples)} examples")
        for index, (record, example) in enumerate(zip(records, examples, strict=False)):
            try:
                expected = instruction_of(example.prompt_messages)
            except ValueError:
                raise DataError(f"example {index}: prompt has no user message") from None
            if record.get("instruction") != expected:
                raise DataError(f"record {index}: instruction does not match example {index} (files out of order?)")

    report: dict[str, Any] = {
        "n": len(outputs),
        "lengths": length_stats(outputs, tokenizer),
        "distinct_1": distinct_n(outputs, 1),
        "distinct_2": distinct_n(outputs, 2),
        "repetition_4": repetition_rate(outputs, 4),
    }

    correct: list[bool | None] | None = None
    if examples is not None and any(_has_answer(e) for e in examples):
        report["exact_match"] = exact_match(outputs, examples)
        correct = correct_flags(outputs, examples)

    per_rouge: list[float | None] = []
    for index, record in enumerate(records):
        reference = record.get("reference")
        if reference is None and examples is not None:
            reference = getattr(examples[index], "reference", None)
        per_rouge.append(None if reference is None else rouge_l(outputs[index], str(reference)))
    scores = [v for v in per_rouge if v is not None]
    if scores:
        report["rouge_l"] = {"mean": float(np.mean(scores)), "n": len(scores)}
    report["per_example"] = {
        "length_chars": list(report["lengths"]["chars"]["values"]),
        "correct": correct,
        "rouge_l": per_rouge if scores else None,
    }
    cut = [int(r[REACHED_CAP]) if isinstance(r.get(REACHED_CAP), bool) else None for r in records]
    known = [c for c in cut if c is not None]
    if known:
        report[REACHED_CAP] = {"share": sum(known) / len(known), "n": len(known)}
        report["per_example"][REACHED_CAP] = cut
    if examples is not None and any(is_ifeval_example(e) for e in examples):
        report["ifeval"] = score_ifeval(outputs, examples)
        report["per_example"].update(report["ifeval"].pop("per_example"))
    return report


def arm_scores(report: Mapping[str, Any]) -> dict[str, Any]:
    """One number per metric from an :func:`evaluate_outputs` report, keyed by the metric registry.

    Every :func:`neftune.metrics.arm_metrics` metric, in registry order, read from where the report
    keeps it (:attr:`~neftune.metrics.MetricSpec.scored_at`; ``None`` when the report lacks it); a metric
    scored per task family is followed by ``<key>_by_family`` (``{family: number}``).  These are the
    numbers of an arm's ``eval`` block in ``results.json``.
    """
    scores: dict[str, Any] = {}
    for spec in arm_metrics():
        path = spec.scored_at or ()
        block: Any = report
        for key in path[:-1]:
            block = block.get(key) if isinstance(block, Mapping) else None
        scores[spec.key] = block.get(path[-1]) if isinstance(block, Mapping) else None
        if spec.by_family:
            families = block.get("per_family", {}) if isinstance(block, Mapping) else {}
            scores[f"{spec.key}_by_family"] = {f: v.get(path[-1]) for f, v in families.items()}
    return scores
