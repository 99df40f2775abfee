"""Bits-back compression: bit-exact round trips (one image, chunks left unfilled, a hundred), a
file rate that is the model's bound plus the direct-coded start, decoding on another CPU
capability, the rounding hints that make that work, a class-conditional checkpoint coded with the
null class, and bad or tampered streams refused."""

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ONE_THREAD, run_cli

from vdm_fast.codec import bitsback, compress
from vdm_fast.io import load_model
from vdm_fast import nn as vnn

pytest.importorskip("constriction")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    net = vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=0, dropout=0.0, gamma_min=-7.0, gamma_max=5.0)
    for p in net.parameters():  # off the zero init, so the model is not trivially eps_hat = z
        p.data.add_(0.005 * torch.randn_like(p))
    return vnn.VDM(net, vnn.LearnedScalarSchedule(-7.0, 5.0), (1, 8, 8), vocab_size=17).eval()


@pytest.fixture(scope="module")
def hundred(digits):
    """100 test images coded at T = 4 in chunks of up to 25."""
    model, chunks = tiny_model(), []
    stream = compress.encode(model, digits[:100], T=4, max_chunk=25, chunks=chunks)
    return model, digits[:100].long(), stream, chunks


def test_round_trip_is_bit_exact_on_100_test_images(hundred):
    model, images, stream, chunks = hundred
    assert chunks[0] == 0 and max(chunks) == 25 and sum(max(c, 1) for c in chunks) == 100
    assert torch.equal(compress.decode(model, stream), images)


def test_one_image_and_a_last_chunk_left_unfilled(digits):
    model = tiny_model()
    chunks = []
    one = compress.encode(model, digits[:1], T=3, chunks=chunks)
    assert chunks == [0] and torch.equal(compress.decode(model, one), digits[:1].long())
    chunks = []
    stream = compress.encode(model, digits[:23], T=3, max_chunk=4, chunks=chunks)
    assert 0 < chunks[-1] < 4 and max(chunks) == 4, chunks  # the last chunk is short
    assert torch.equal(compress.decode(model, stream), digits[:23].long())


def direct_bits(model, images, T):
    chain = bitsback.Chain(compress.coding_model(model), T, 4)
    return bitsback.direct_bits(chain, images.reshape(len(images), -1).numpy())


def test_a_file_of_directly_coded_images_costs_what_their_model_says(digits):
    """Too few images for bits-back: all are coded by the direct model, and the payload is its
    information content plus the ANS coder's own few words (its head and one chunk size)."""
    model, images = tiny_model(), digits[:3].long()
    chunks = []
    stream = compress.encode(model, images, T=10, chunks=chunks)
    assert chunks == [0, 0, 0]
    payload = compress.rate_report(stream, 3, 64)["payload_bpd"] * 3 * 64
    bits = direct_bits(model, images, T=10)
    assert bits < 3 * 64 * math.log2(17) * 0.9  # better than uniform over the values
    assert bits <= payload <= bits + 80
    assert torch.equal(compress.decode(model, stream), images)


def test_the_file_costs_the_bound_plus_its_direct_start(digits):
    """No seeded initial bits: the payload is the images coded directly (what the direct model
    says they cost) plus the T-step negative ELBO of the others (plus a bit or two per chunk for
    its size).

    (The coder's pops read the bits its previous pushes wrote; where the model is poor and its
    steps coarse these are far from uniform and the rate rises above the bound: this random
    model, 8.5 bpd, costs 8 % over at T = 20 and 1 % over at T = 100.)"""
    model, images, T, chunks = tiny_model(), digits[:60].long(), 100, []
    stream = compress.encode(model, images, T=T, max_chunk=16, chunks=chunks)
    direct = chunks.count(0)
    assert chunks[:direct] == [0] * direct and 0 < direct < 8
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        nelbo = torch.stack([model.double().bpd(images[direct:], T=T, generator=g) for _ in range(100)]).mean()
    expected = direct_bits(model, images[:direct], T) + 64 * (60 - direct) * nelbo.item()
    report = compress.rate_report(stream, 60, 64)
    assert report["payload_bpd"] * 60 * 64 == pytest.approx(expected, rel=0.03)
    assert report["total_bpd"] * 60 * 64 == report["payload_bpd"] * 60 * 64 + report["container_bits"]


def _decode_in_subprocess(tmp_path, model, stream, env):
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "s.vdmz").write_bytes(stream)
    script = (
        "import os, sys, torch, numpy as np\n"
        "sys.path[:0] = sys.argv[1].split(os.pathsep)\n"
        "from test_compress import tiny_model\n"
        "from vdm_fast.codec import compress\n"
        "model = tiny_model()\n"
        "model.load_state_dict(torch.load(sys.argv[2] + '/model.pt', weights_only=True))\n"
        "x = torch.linspace(-2, 2, 64, dtype=torch.float64).reshape(1, 1, 8, 8)\n"
        "with torch.no_grad():\n"
        "    eps = model.double().score_net(x, torch.full((1,), -1.0, dtype=torch.float64))\n"
        "np.save(sys.argv[2] + '/eps.npy', eps.numpy())\n"
        "stream = open(sys.argv[2] + '/s.vdmz', 'rb').read()\n"
        "np.save(sys.argv[2] + '/out.npy', compress.decode(model, stream).numpy())\n"
    )
    # sys.argv[1]: this folder (for test_compress) and tests/ (for the helpers it imports).
    here = os.path.dirname(__file__)
    # cwd: python -c puts the working directory on sys.path, and the repository root's source
    # folder would shadow the installed package (and refuse to import).
    proc = subprocess.run([sys.executable, "-c", script, os.pathsep.join([here, os.path.dirname(here)]),
                           str(tmp_path)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(tmp_path / "eps.npy"), np.load(tmp_path / "out.npy")


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"},
                                 {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                                  "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}], ids=["avx2", "default"])
def test_a_file_decodes_under_another_cpu_capability(tmp_path, hundred, env):
    model, images, stream, _ = hundred
    eps, decoded = _decode_in_subprocess(tmp_path, model, stream, env)
    assert np.array_equal(decoded, images.numpy())
    if env["ATEN_CPU_CAPABILITY"] == "default":  # the test means something: the network's outputs differ
        x = torch.linspace(-2, 2, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
        with torch.no_grad():
            here = model.double().score_net(x, torch.full((1,), -1.0, dtype=torch.float64)).numpy()
        assert not np.array_equal(eps, here) and np.abs(eps - here).max() < 1e-12


def _noisy_decode(model, stream, noise, seed=0):
    """Decode as on a machine whose network outputs differ from the sender's by ~``noise``."""
    rng = np.random.default_rng(seed)
    exact = bitsback.Chain.eps_hat
    bitsback.Chain.eps_hat = lambda self, k, i: (lambda e: e + noise * rng.standard_normal(e.shape))(exact(self, k, i))
    try:
        return compress.decode(model, stream)
    finally:
        bitsback.Chain.eps_hat = exact


def test_rounding_hints_carry_the_decode_across_differing_arithmetic(digits, monkeypatch):
    """With a margin of 2^-24 (here, to make hints common) the receiver decodes through network
    outputs that differ by 1e-8; without hints the same difference breaks the decode, and is
    reported, never returned as images."""
    model, images = tiny_model(), digits[:40].long()
    hints = []
    push = bitsback.Coder.push_hints
    monkeypatch.setattr(bitsback.Coder, "push_hints", lambda self, h, size: (hints.append(h.size), push(self, h, size)))
    monkeypatch.setattr(bitsback, "_MARGIN", 2.0**-24)
    stream = compress.encode(model, images, T=4, max_chunk=8)
    assert sum(hints) >= 10
    assert torch.equal(_noisy_decode(model, stream, 1e-8), images)
    monkeypatch.setattr(bitsback, "_MARGIN", 2.0**-60)
    bare = compress.encode(model, images, T=4, max_chunk=8)
    with pytest.raises(compress.CodecError, match="differ|damaged|digest"):
        _noisy_decode(model, bare, 1e-8)


def test_a_receiver_beyond_the_margin_is_told_so(digits, monkeypatch):
    model, images = tiny_model(), digits[:20].long()
    monkeypatch.setattr(bitsback, "_MARGIN", 2.0**-20)  # hints common, so checks are dense
    stream = compress.encode(model, images, T=3, max_chunk=8)
    with pytest.raises(compress.CodecError, match="differ"):
        _noisy_decode(model, stream, 3e-6)


def test_portable_exp_is_exp():
    x = -np.random.default_rng(0).exponential(30.0, 10_000)
    assert np.allclose(bitsback.portable_exp(x), np.exp(x), rtol=1e-15, atol=0)


def test_a_conditional_checkpoint_compresses_with_the_null_class(conditional_ckpt, tmp_path, digits):
    pytest.importorskip("constriction")
    images = digits[:12].permute(0, 2, 3, 1).numpy().astype(np.uint8)
    np.save(tmp_path / "in.npy", images)
    enc = run_cli("vdm_fast.codec.compress", ["encode", "--ckpt", str(conditional_ckpt), "--input", str(tmp_path / "in.npy"),
                                        "--output", str(tmp_path / "out.vdmz"), "--T", "3", "--max-chunk", "4"],
                  env=ONE_THREAD)
    assert enc.returncode == 0 and "bits per dim" in enc.stdout, enc.stderr
    dec = run_cli("vdm_fast.codec.compress", ["decode", "--ckpt", str(conditional_ckpt), "--input", str(tmp_path / "out.vdmz"),
                                        "--output", str(tmp_path / "back.npy")],
                  env=ONE_THREAD)
    assert dec.returncode == 0, dec.stderr
    assert np.array_equal(np.load(tmp_path / "back.npy"), images)
    # the library call codes with the null class too: the same stream
    from vdm_fast.codec import compress

    model, _, _ = load_model(conditional_ckpt)
    assert model.num_classes == 10
    stream = compress.encode(model, torch.from_numpy(images).permute(0, 3, 1, 2), T=3, max_chunk=4)
    assert stream == (tmp_path / "out.vdmz").read_bytes()


# --- bad, tampered and foreign streams and files ----------------------------------------------

def test_damaged_truncated_foreign_old_and_bad_arguments_are_refused(digits):
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
    old = b"VDMZ" + (2).to_bytes(2, "little") + stream[6:-compress._CHECKSUM_BYTES]
    with pytest.raises(compress.CodecError, match="version 2 is not supported"):
        compress.decode(model, old + compress._checksum(old))
    with pytest.raises(compress.CodecError, match="non-empty"):
        compress.encode(model, digits[:0], T=2)
    with pytest.raises(compress.CodecError, match=r"\[0, 17\)"):
        compress.encode(model, torch.full((2, 1, 8, 8), 17), T=2)
    for name, value in (("grid_bits", 16), ("T", 0), ("max_chunk", 0), ("max_chunk", 2.0)):
        with pytest.raises(compress.CodecError, match=name):
            compress.encode(model, digits[:2], **{"T": 2, name: value})
    compress._check_chunk(341, 3 * 32 * 32, 256, "CIFAR")  # the pixel distributions' bound: 2^28 values
    with pytest.raises(compress.CodecError, match="CIFAR: max_chunk x dims"):
        compress._check_chunk(342, 3 * 32 * 32, 256, "CIFAR")


@pytest.fixture(scope="module")
def tiny_stream(tiny_ckpt):
    model, _, _ = load_model(tiny_ckpt)
    images = torch.randint(0, 17, (12, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    chunks = []
    stream = compress.encode(model, images, T=2, chunks=chunks)
    assert 0 in chunks and max(chunks) > 0  # both direct and bits-back chunks are in the stream
    return model, images, stream


def _with_header(stream: bytes, **changes) -> bytes:
    """The stream re-packed with header fields changed, under a valid checksum."""
    header, payload = compress._unpack(stream)
    return compress._pack(dataclasses.replace(header, **changes), payload)


@pytest.mark.parametrize("changes", [dict(T=10**12), dict(T=0), dict(shape=(2**31, 1, 8, 8)),
                                     dict(shape=(10**6, 1, 8, 8)), dict(max_chunk=10**6), dict(grid_bits=40),
                                     dict(shape=(2, 3, 8, 8)), dict(vocab_size=1), dict(fingerprint=b"\0" * 4),
                                     dict(digest=b"\0" * 4), dict(max_chunk=1)])
def test_tampered_stream_headers_raise_codec_error(tiny_stream, changes):
    model, _, stream = tiny_stream
    with pytest.raises(compress.CodecError):
        compress.decode(model, _with_header(stream, **changes))


def test_tampered_payloads_never_decode_to_wrong_images(tiny_stream):
    model, images, stream = tiny_stream
    header, payload = compress._unpack(stream)
    body = stream[:-compress._CHECKSUM_BYTES]
    rng = np.random.default_rng(0)
    for _ in range(8):
        damaged = bytearray(body)
        i = int(rng.integers(len(body) - 4 * payload.size, len(body)))
        damaged[i] ^= 1 << int(rng.integers(0, 8))
        try:
            decoded = compress.decode(model, bytes(damaged) + compress._checksum(bytes(damaged)))
        except compress.CodecError:
            continue
        assert torch.equal(decoded, images)
    with pytest.raises(compress.CodecError, match="runs past its end|longer than 63 bits"):
        truncated = stream[:7] + b"\xff" * 9
        compress.decode(model, truncated + compress._checksum(truncated))


def test_encode_refuses_an_npz_or_non_image_file_in_one_line(tmp_path, tiny_ckpt):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    (tmp_path / "text.npy").write_text("not numpy")
    for name in ("a.npz", "text.npy"):
        proc = run_cli("vdm_fast.codec.compress", ["encode", "--ckpt", str(tiny_ckpt), "--input", str(tmp_path / name),
                                             "--output", str(tmp_path / "out.vdmz")])
        assert proc.returncode != 0 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, \
            proc.stderr


def test_cli_round_trip(tmp_path, digits):
    from vdm_fast.io import checkpoint
    from vdm_fast import config
    from vdm_fast.factory import build_model

    cfg = config.parse_args(["--n-embd", "32", "--n-layer", "0"])
    model = build_model(cfg, (1, 8, 8), 17)
    names = [n for n, _ in model.named_parameters()]
    checkpoint.save(tmp_path / "ck.pt", {"config": config.to_dict(cfg), "step": 0, "model": model.state_dict(),
                                         "ema": dict(zip(names, model.parameters())), "image_shape": [1, 8, 8],
                                         "vocab_size": 17, "num_classes": 0})
    images = digits[:5].permute(0, 2, 3, 1).numpy()
    np.save(tmp_path / "in.npy", images)
    args = ["--ckpt", str(tmp_path / "ck.pt")]
    compress.main(["encode", *args, "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "s.vdmz"),
                   "--T", "3", "--max-chunk", "2"])
    compress.main(["decode", *args, "--input", str(tmp_path / "s.vdmz"), "--output", str(tmp_path / "out.npy")])
    assert np.array_equal(np.load(tmp_path / "out.npy"), images)
    with pytest.raises(SystemExit, match="checksum"):
        (tmp_path / "bad.vdmz").write_bytes((tmp_path / "s.vdmz").read_bytes()[:-1] + b"\x00")
        compress.main(["decode", *args, "--input", str(tmp_path / "bad.vdmz"), "--output", str(tmp_path / "o.npy")])
    assert math.isfinite(compress.rate_report((tmp_path / "s.vdmz").read_bytes(), 5, 64)["total_bpd"])
