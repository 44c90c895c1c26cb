"""Statistics and exact properties of the pure noise function."""

from __future__ import annotations

import math

import pytest
import torch

from neftune import example_lengths, noisy_embeddings

D = 64


def _bound(alpha: float, length: int, d: int = D) -> float:
    return alpha / math.sqrt(length * d)


def _draw(shape, n_draws=40, **kw):
    """Noise only (input zeros), stacked over independent draws."""
    gen = torch.Generator().manual_seed(0)
    return torch.stack([noisy_embeddings(torch.zeros(shape), generator=gen, **kw) for _ in range(n_draws)])


def test_padded_batch_per_example_magnitude_and_zero_padding():
    lengths = [5, 12, 40]
    mask = torch.zeros(3, 40, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    noise = _draw((3, 40, D), alpha=5.0, attention_mask=mask)
    for i, n in enumerate(lengths):
        real = noise[:, i, :n]
        bound = _bound(5.0, n)
        assert real.abs().max() <= bound
        assert real.abs().max() >= 0.99 * bound
        assert real.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
        assert real.mean().item() == pytest.approx(0.0, abs=0.02 * bound)
        assert torch.count_nonzero(noise[:, i, n:]) == 0  # padding untouched, exactly


def test_left_padding_is_handled_like_right_padding():
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    noise = _draw((2, 5, D), alpha=10.0, attention_mask=mask)
    assert torch.count_nonzero(noise[:, 0, :3]) == 0
    assert noise[:, 0, 3:].abs().max() <= _bound(10.0, 2)
    assert noise[:, 0, 3:].abs().max() > 0.99 * _bound(10.0, 2)
    assert noise[:, 1].abs().max() <= _bound(10.0, 5)


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_row_each_segment_is_its_own_example(how):
    lengths = [5, 12, 40]
    if how == "position_ids":
        kw = {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    else:
        kw = {"cu_seq_lens": torch.tensor([0, 5, 17, 57], dtype=torch.int32)}
    noise = _draw((1, 57, D), alpha=5.0, **kw)
    start = 0
    for n in lengths:
        seg = noise[:, 0, start : start + n]
        bound = _bound(5.0, n)
        assert seg.abs().max() <= bound and seg.abs().max() >= 0.99 * bound
        assert seg.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
        start += n


def test_cu_seq_lens_tail_beyond_last_boundary_is_padding():
    noise = _draw((1, 10, D), alpha=5.0, cu_seq_lens=torch.tensor([0, 3, 7]))
    assert torch.count_nonzero(noise[:, 0, 7:]) == 0
    assert noise[:, 0, :3].abs().max() <= _bound(5.0, 3)


def test_packed_rows_with_padding_and_several_rows():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    lengths = example_lengths((2, 6), attention_mask=mask, position_ids=pos)
    assert lengths.tolist() == [[3, 3, 3, 2, 2, 0], [4, 4, 4, 4, 1, 1]]


def test_no_mask_no_positions_means_whole_row():
    noise = _draw((2, 30, D), alpha=5.0)
    assert noise.abs().max() <= _bound(5.0, 30)
    assert noise.abs().max() > 0.99 * _bound(5.0, 30)


def test_alpha_zero_returns_input_unchanged():
    x = torch.randn(2, 7, D)
    assert noisy_embeddings(x, 0.0) is x


def test_low_precision_dtype_is_kept_and_noise_is_fp32_scaled():
    x = torch.zeros(2, 16, D, dtype=torch.bfloat16)
    out = noisy_embeddings(x, 5.0, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.bfloat16
    ref = noisy_embeddings(x.float(), 5.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, ref.to(torch.bfloat16))


def test_gaussian_is_scaled_to_the_same_multiplier():
    noise = _draw((1, 20, D), n_draws=60, alpha=5.0, distribution="gaussian")
    assert noise.std().item() == pytest.approx(_bound(5.0, 20), rel=0.03)


def test_same_generator_seed_same_noise_different_seed_different():
    x = torch.zeros(2, 8, D)
    a = noisy_embeddings(x, 5.0, generator=torch.Generator().manual_seed(3))
    b = noisy_embeddings(x, 5.0, generator=torch.Generator().manual_seed(3))
    c = noisy_embeddings(x, 5.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_passes_through_unchanged():
    x = torch.randn(2, 5, D, requires_grad=True)
    noisy_embeddings(x, 5.0).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_unbatched_input():
    out = noisy_embeddings(torch.zeros(9, D), 5.0, attention_mask=torch.tensor([1] * 6 + [0] * 3))
    assert out.shape == (9, D)
    assert torch.count_nonzero(out[6:]) == 0 and out[:6].abs().max() <= _bound(5.0, 6)


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf")])
def test_bad_alpha_is_a_value_error(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        noisy_embeddings(torch.zeros(1, 2, D), alpha)


def test_alpha_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="alpha must be a number"):
        noisy_embeddings(torch.zeros(1, 2, D), "5")  # type: ignore[arg-type]


def test_integer_embeddings_are_a_type_error():
    with pytest.raises(TypeError, match="floating-point embeddings"):
        noisy_embeddings(torch.zeros(1, 2, D, dtype=torch.long), 5.0)


def test_unknown_distribution_is_a_value_error():
    with pytest.raises(ValueError, match="distribution"):
        noisy_embeddings(torch.zeros(1, 2, D), 5.0, distribution="laplace")  # type: ignore[arg-type]


def test_mask_of_wrong_shape_is_a_value_error():
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        noisy_embeddings(torch.zeros(2, 4, D), 5.0, attention_mask=torch.ones(2, 5))
