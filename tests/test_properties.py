"""Properties over generated inputs: the noise bound and zero padding for any shape, mask, packing and
dtype; and the data loaders' account of every record of any mix of good and bad records."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neftune import noisy_embeddings
from neftune.data.formats import load_examples
from neftune.errors import DataError

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


# -- the noise ---------------------------------------------------------------------------------


def _split(draw, total: int) -> list[int]:
    """Random positive parts summing to ``total`` (empty for 0)."""
    if total == 0:
        return []
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=min(total - 1, 6))) if total > 1 else [])
    bounds = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(bounds)]


@st.composite
def noise_cases(draw):
    """Embeddings plus the mask/position ids/cu_seq_lens of a layout, and each token's example id (-1: padding)."""
    batch, seq, width = draw(st.integers(1, 4)), draw(st.integers(1, 20)), draw(st.integers(1, 40))
    layout = draw(
        st.sampled_from(["whole rows", "right", "left", "random mask", "packed", "packed + padding", "cu_seq_lens"])
    )
    example = torch.full((batch, seq), -1, dtype=torch.long)
    mask = position_ids = cu_seq_lens = None
    next_id = 0
    if layout == "whole rows":
        example = torch.arange(batch)[:, None].expand(batch, seq).clone()
    elif layout in ("right", "left", "random mask"):
        mask = torch.zeros(batch, seq, dtype=torch.long)
        for b in range(batch):
            if layout == "random mask":
                bits = draw(st.lists(st.booleans(), min_size=seq, max_size=seq))
                mask[b] = torch.tensor(bits, dtype=torch.long)
            else:
                n = draw(st.integers(0, seq))
                if layout == "right":
                    mask[b, :n] = 1
                else:
                    mask[b, seq - n :] = 1
            example[b][mask[b] == 1] = b
    elif layout in ("packed", "packed + padding"):
        position_ids = torch.zeros(batch, seq, dtype=torch.long)
        if layout == "packed + padding":
            mask = torch.zeros(batch, seq, dtype=torch.long)
            pad_style = draw(st.sampled_from(["zeros", "continue"]))
        for b in range(batch):
            real = seq if layout == "packed" else draw(st.integers(0, seq))
            t = 0
            for n in _split(draw, real):
                position_ids[b, t : t + n] = torch.arange(n)
                example[b, t : t + n] = next_id
                next_id, t = next_id + 1, t + n
            if mask is not None:
                mask[b, :real] = 1
                if pad_style == "continue" and real < seq:
                    start = int(position_ids[b, real - 1]) + 1 if real else 0
                    position_ids[b, real:] = torch.arange(start, start + seq - real)
    else:  # padding-free cu_seq_lens over the flattened batch; tokens past the last boundary are padding
        real = draw(st.integers(0, batch * seq))
        parts = _split(draw, real)
        cu_seq_lens = torch.tensor([0, *torch.tensor(parts, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
        flat = example.view(-1)
        for k, (a, b) in enumerate(zip(cu_seq_lens[:-1].tolist(), cu_seq_lens[1:].tolist(), strict=False)):
            flat[a:b] = k

    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.0, 1e-3, 0.05, 1.0, 30.0]))
    alpha = draw(st.one_of(st.just(0.0), st.floats(1e-3, 50.0, allow_nan=False)))
    seed = draw(st.integers(0, 2**31 - 1))
    x = torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(seed)) * scale
    x[example < 0] = 0.0  # padding embeddings are zero, so their output must be exactly zero
    return x.to(dtype), alpha, mask, position_ids, cu_seq_lens, example, seed


@SETTINGS
@given(noise_cases())
def test_noise_is_bounded_per_example_and_zero_on_padding(case):
    x, alpha, mask, position_ids, cu_seq_lens, example, seed = case
    out = noisy_embeddings(
        x,
        alpha,
        attention_mask=mask,
        position_ids=position_ids,
        cu_seq_lens=cu_seq_lens,
        generator=torch.Generator().manual_seed(seed),
    )
    assert out.dtype == x.dtype and out.shape == x.shape
    padding = example < 0
    assert torch.count_nonzero(out[padding]) == 0
    if alpha == 0:
        assert torch.equal(out, x)
        return

    width = x.shape[-1]
    ids, counts = torch.unique(example[~padding], return_counts=True)
    length = torch.zeros(example.shape, dtype=torch.float64)
    for i, n in zip(ids.tolist(), counts.tolist(), strict=False):
        length[example == i] = n
    bound = torch.where(padding, 0.0, alpha / torch.sqrt(length.clamp(min=1) * width))[..., None]
    noise = out.double() - x.double()
    # the sum is rounded to the embeddings' dtype (and computed in fp32 for float64 input)
    eps = max(torch.finfo(x.dtype).eps, torch.finfo(torch.float32).eps)
    tiny = torch.finfo(x.dtype).smallest_normal * torch.finfo(x.dtype).eps
    tolerance = 4 * eps * (x.double().abs() + bound) + tiny
    excess = noise.abs() - bound - tolerance
    assert excess.max() <= 0, f"noise exceeds alpha/sqrt(L*d) by {excess.max().item():.3g}"

    # and it reaches the bound's order: per example, of L*d >= 40 uniform draws one exceeds bound/2
    # (a chance of 2^-40 to fail), wherever rounding is small against the bound
    for i, n in zip(ids.tolist(), counts.tolist(), strict=False):
        where = example == i
        b = alpha / math.sqrt(n * width)
        if n * width >= 40 and tolerance[where].max() <= 0.05 * b:
            assert noise[where].abs().max() >= 0.45 * b, (i, n)


@SETTINGS
@given(st.data())
def test_gaussian_noise_is_zero_on_padding(data):
    x, alpha, mask, position_ids, cu_seq_lens, example, seed = data.draw(noise_cases())
    out = noisy_embeddings(
        x,
        alpha,
        attention_mask=mask,
        position_ids=position_ids,
        cu_seq_lens=cu_seq_lens,
        distribution="gaussian",
        generator=torch.Generator().manual_seed(seed),
    )
    assert out.dtype == x.dtype and torch.count_nonzero(out[example < 0]) == 0


# -- the data loaders --------------------------------------------------------------------------

text = st.text(max_size=12)
filled = text.filter(str.strip)
blank = st.sampled_from(["", " ", "\n\t "])


def turns(roles: list[str]) -> st.SearchStrategy:
    return st.tuples(*[st.fixed_dictionaries({"role": st.just(r), "content": filled}) for r in roles]).map(list)


good_alpaca = st.fixed_dictionaries(
    {"instruction": filled, "output": filled}, optional={"input": text, "system": text, "id": st.integers()}
)
good_messages = (
    st.sampled_from(
        [["user", "assistant"], ["system", "user", "assistant"], ["user", "assistant", "user", "assistant"]]
    )
    .flatmap(turns)
    .map(lambda m: {"messages": m})
)
bad_alpaca = st.one_of(
    st.fixed_dictionaries({"instruction": filled}),  # missing output
    st.fixed_dictionaries({"instruction": filled, "output": blank}),
    st.fixed_dictionaries({"instruction": blank, "output": filled}),
    st.fixed_dictionaries({"instruction": filled, "output": st.one_of(st.integers(), st.lists(text, max_size=2))}),
    st.fixed_dictionaries({"instruction": st.integers(), "output": filled}),
)
bad_messages = st.one_of(
    turns(["user"]).map(lambda m: {"messages": m}),  # ends with the user
    turns(["user", "assistant", "user"]).map(lambda m: {"messages": m}),
    st.just({"messages": []}),
    st.fixed_dictionaries({"messages": st.one_of(text, st.integers())}),
    st.tuples(
        filled,
        filled.filter(
            lambda r: (
                r.strip().lower()
                not in {"system", "human", "user", "gpt", "assistant", "chatgpt", "bard", "bing", "model"}
            )
        ),
    ).map(lambda pair: {"messages": [{"role": "user", "content": "hi"}, {"role": pair[1], "content": pair[0]}]}),
    st.just({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}]}),
    st.just({"messages": [{"role": "user", "content": "hi"}, "not a turn"]}),
    st.just({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}),
)
not_objects = st.one_of(st.integers(), st.lists(st.integers(), max_size=3), text, st.none(), st.booleans())
records = st.one_of(good_alpaca, good_messages, bad_alpaca, bad_messages, not_objects)
raw_lines = st.sampled_from(
    [
        b'{"instruction": "cut',
        b'{"instruction": "caf\xe9", "output": "x"}',
        b"[1, 2",
        b"not json at all",
        b'{"instruction": "a", "output": "b"} trailing',
    ]
)
lines = st.lists(
    st.one_of(records.map(lambda r: json.dumps(r).encode()), raw_lines, blank.map(str.encode)), min_size=1, max_size=12
)


def _check(result, total: int) -> None:
    assert len(result.examples) + sum(result.skipped.values()) == result.total == total
    for example in result.examples:
        roles = [m["role"] for m in example.messages]
        assert "user" in roles and roles[-1] == "assistant"
        assert set(roles) <= {"system", "user", "assistant"}
        assert all(m["content"].strip() for m in example.messages if m["role"] != "system")
        assert example.reference == example.messages[-1]["content"]


def _load(path: Path, mode: str):
    try:
        return load_examples(str(path), on_bad_record=mode)
    except DataError as error:
        message = str(error)
        assert "\n" not in message and "\r" not in message, message
        assert message.startswith(str(path)), message
        return error


@SETTINGS
@given(lines)
def test_every_jsonl_record_is_loaded_or_counted(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("jsonl") / "records.jsonl"
    path.write_bytes(b"\n".join(body) + b"\n")
    total = sum(1 for line in body if line.strip())

    skipped = _load(path, "skip")
    strict = _load(path, "error")
    if isinstance(skipped, DataError):
        assert isinstance(strict, DataError)  # nothing usable, or a file whose format cannot be told
        return
    _check(skipped, total)
    if skipped.skipped:
        assert isinstance(strict, DataError)  # error mode stops at the first bad record
    else:
        assert not isinstance(strict, DataError) and strict.examples == skipped.examples


@SETTINGS
@given(st.lists(records, min_size=1, max_size=12))
def test_every_json_array_record_is_loaded_or_counted(tmp_path_factory, items):
    path = tmp_path_factory.mktemp("array") / "records.json"
    path.write_text(json.dumps(items, indent=1), encoding="utf-8")
    result = _load(path, "skip")
    if not isinstance(result, DataError):
        _check(result, len(items))
