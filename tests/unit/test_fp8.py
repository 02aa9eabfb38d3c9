"""FP8 E4M3 codec round trips: ordinary values, zeros, huge and tiny rows, NaN/Inf reported."""

import math

import pytest
import torch

from trainer.compress.fp8 import decode, encode_channels, encode_rows

pytestmark = pytest.mark.timeout(30)
REL = 2**-4  # E4M3 round-to-nearest: half of 2^-3


def _within_e4m3(got, x, scale):
    # relative 2^-4 in the normal range, absolute scale * 2^-10 in the subnormal range
    bound = torch.maximum(x.abs() * REL, scale * 2**-10) + 1e-45
    return bool(torch.all((got - x).abs() <= bound))


def test_row_round_trip_error_is_bounded():
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    enc = encode_rows(x)
    assert enc.payload.dtype == torch.uint8 and enc.scales.shape == (64, 1)
    assert _within_e4m3(decode(enc), x, enc.scales)
    assert enc.nonfinite == 0
    assert enc.nbytes == 64 * 256 + 64 * 4  # a quarter of fp32, plus the scales


def test_channel_scales_over_groups_of_128_tokens():
    torch.manual_seed(0)
    x = torch.randn(256, 32) * torch.logspace(-4, 4, 32)[None, :]  # outliers by channel
    enc = encode_channels(x)
    assert enc.scales.shape == (2, 1, 32)
    per_group = enc.scales.expand(2, 128, 32).reshape(256, 32)
    assert _within_e4m3(decode(enc), x, per_group)


def test_rows_of_zeros_decode_to_zeros():
    x = torch.zeros(4, 16)
    x[2] = torch.randn(16)
    got = decode(encode_rows(x))
    assert torch.equal(got[[0, 1, 3]], torch.zeros(3, 16))
    assert not torch.isnan(got).any()


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_huge_and_tiny_rows_keep_their_precision(magnitude):
    torch.manual_seed(0)
    x = torch.randn(8, 64) * magnitude
    enc = encode_rows(x)
    got = decode(enc)
    assert torch.isfinite(got).all()
    assert _within_e4m3(got, x, enc.scales)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_reported_and_do_not_flush_the_row(bad):
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    x[1, 5] = bad
    enc = encode_rows(x)
    assert enc.nonfinite == 1
    got = decode(enc)
    assert torch.isnan(got[1, 5])  # reported downstream as NaN, never as a finite number
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[1, 5] = False
    assert _within_e4m3(got[keep], x[keep], enc.scales.expand(4, 32)[keep])
    assert got[1].abs().nan_to_num().max() > 0  # the rest of the row survives


def test_channel_codec_reports_non_finite_too():
    x = torch.randn(128, 8)
    x[7, 3] = math.inf
    enc = encode_channels(x)
    assert enc.nonfinite == 1 and torch.isnan(decode(enc)[7, 3])
