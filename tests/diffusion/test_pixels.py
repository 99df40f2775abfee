"""``diffusion/pixels.py``: encoding integer images into [-1, 1] and decoding them back, and the
decoder's distribution over the values."""

import torch
from helpers import assert_close

from vdm_fast.diffusion import pixels


def test_decoder_probabilities_sum_to_one_and_peak_at_the_data():
    vocab = 256
    x = torch.randint(0, vocab, (3, 50))
    gamma_0 = torch.tensor([-13.3, -13.3, 2.0], dtype=torch.float64)
    eps = torch.randn(3, 50, dtype=torch.float64)
    z = pixels.encode(x, vocab, torch.float64) + torch.exp(0.5 * gamma_0)[:, None] * eps
    probs = torch.softmax(pixels.decoder_logits(z, gamma_0, vocab), dim=-1)
    assert_close(probs.sum(-1), torch.ones(3, 50, dtype=torch.float64), 1e-12)
    # At gamma_0 = -13.3 the noise std is 0.0013, a sixth of a bin: the argmax is the data.
    assert torch.equal(pixels.decode(z[:2], gamma_0[:2], vocab), x[:2])
    # At high noise the decoder is spread over many values.
    assert probs[2].max(-1).values.max() < 0.5


def test_encode_decode_round_trip_without_noise():
    for vocab in (2, 17, 256):
        x = torch.arange(vocab).reshape(1, -1)
        f = pixels.encode(x, vocab, torch.float64)
        assert f.min() > -1 and f.max() < 1
        assert torch.equal(pixels.decode(f, torch.tensor([-13.3], dtype=torch.float64), vocab), x)
