"""Bits-back compression: bit-exact round trips, a rate close to the negative ELBO, and streams
that are damaged, truncated or made for another model refused."""

import math

import numpy as np
import pytest
import torch

from vdm_fast import compress, data
from vdm_fast import nn as vnn

pytest.importorskip("constriction")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    net = vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=0, dropout=0.0, gamma_min=-7.0, gamma_max=5.0)
    for p in net.parameters():  # off the zero init, so the model is not trivially eps_hat = z
        p.data.add_(0.005 * torch.randn_like(p))
    return vnn.VDM(net, vnn.LearnedScalarSchedule(-7.0, 5.0), (1, 8, 8), vocab_size=17).eval()


@pytest.fixture(scope="module")
def digits():
    return data.load_digits().test.images


def test_round_trip_is_bit_exact_on_100_test_images(digits):
    model = tiny_model()
    images = digits[:100]
    stream = compress.encode(model, images, T=4, chunk=25)
    assert torch.equal(compress.decode(model, stream), images.long())


def test_round_trip_one_image_per_chunk_and_odd_chunks(digits):
    model = tiny_model()
    images = digits[:7]
    for chunk in (1, 3):
        assert torch.equal(compress.decode(model, compress.encode(model, images, T=3, chunk=chunk)), images.long())


def test_net_rate_is_the_negative_elbo(digits):
    """The net rate (file bits less the stated initial-bits overhead) matches the T-step
    negative ELBO of the same images, estimated by the model itself.

    (With few steps and a poor model a latent can land > 5.6 std from p's mean, where the
    coder's 24-bit probability floor makes it cheaper than the Gaussian: the rate then drops
    below the bound. Enough steps keep every latent well inside.)"""
    model = tiny_model()
    images = digits[:60]
    T = 20
    stream = compress.encode(model, images, T=T, chunk=60)
    report = compress.rate_report(stream, len(images), 64)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        nelbo = torch.stack([model.double().bpd(images, T=T, generator=g) for _ in range(200)]).mean().item()
    assert report["net_bpd"] == pytest.approx(nelbo, rel=0.03)
    assert report["total_bpd"] > report["net_bpd"] > 0


def test_damaged_truncated_foreign_and_empty_streams_are_refused(digits):
    model = tiny_model()
    stream = compress.encode(model, digits[:3], T=2)
    flipped = bytearray(stream)
    flipped[len(stream) // 2] ^= 0x40
    with pytest.raises(compress.CodecError, match="checksum"):
        compress.decode(model, bytes(flipped))
    with pytest.raises(compress.CodecError, match="checksum|too short"):
        compress.decode(model, stream[:-10])
    with pytest.raises(compress.CodecError, match="not a vdm_fast"):
        compress.decode(model, b"PNG" + stream)
    with pytest.raises(compress.CodecError, match="another model"):
        compress.decode(tiny_model(seed=1), stream)
    with pytest.raises(compress.CodecError, match="non-empty"):
        compress.encode(model, digits[:0], T=2)
    with pytest.raises(compress.CodecError, match=r"\[0, 17\)"):
        compress.encode(model, torch.full((2, 1, 8, 8), 17), T=2)
    with pytest.raises(compress.CodecError, match="grid_bits"):
        compress.encode(model, digits[:2], T=2, grid_bits=16)


def test_cli_round_trip(tmp_path, digits):
    from vdm_fast import checkpoint, config

    cfg = config.parse_args(["--n-embd", "32", "--n-layer", "0"])
    model = checkpoint.build_model(cfg, (1, 8, 8), 17)
    names = [n for n, _ in model.named_parameters()]
    checkpoint.save(tmp_path / "ck.pt", {"config": config.to_dict(cfg), "step": 0, "model": model.state_dict(),
                                         "ema": dict(zip(names, model.parameters())), "image_shape": [1, 8, 8],
                                         "vocab_size": 17, "num_classes": 0})
    images = digits[:5].permute(0, 2, 3, 1).numpy()
    np.save(tmp_path / "in.npy", images)
    args = ["--ckpt", str(tmp_path / "ck.pt")]
    compress.main(["encode", *args, "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "s.vdmz"), "--T", "3"])
    compress.main(["decode", *args, "--input", str(tmp_path / "s.vdmz"), "--output", str(tmp_path / "out.npy")])
    assert np.array_equal(np.load(tmp_path / "out.npy"), images)
    with pytest.raises(SystemExit, match="checksum"):
        (tmp_path / "bad.vdmz").write_bytes((tmp_path / "s.vdmz").read_bytes()[:-1] + b"\x00")
        compress.main(["decode", *args, "--input", str(tmp_path / "bad.vdmz"), "--output", str(tmp_path / "o.npy")])
    assert math.isfinite(compress.rate_report((tmp_path / "s.vdmz").read_bytes(), 5, 64)["net_bpd"])
