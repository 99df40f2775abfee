"""Bits-back lossless compression of integer images with a trained VDM (BB-ANS).

    python -m vdm_fast.compress encode --ckpt CKPT --input images.npy --output out.vdmz [--T 100]
    python -m vdm_fast.compress decode --ckpt CKPT --input out.vdmz --output images.npy

The model is the T-step discrete-time VDM: ``p(z_1) prod_i p(z_s | z_t) p(x | z_0)``, with the
inference chain ``q(z_1 | x) prod_i q(z_s | z_t, x)``. Per chunk of images, on one ANS stack
(``constriction``):

1. the sender *decodes* ``z_1`` from ``q(z_1 | x)`` and each ``z_s`` from ``q(z_s | z_t, x)``
   (taking bits off the stack: the bits-back step), then
2. *encodes* ``x`` under ``p(x | z_0)``, each ``z_s`` under ``p(z_s | z_t)`` and ``z_1`` under
   ``p(z_1)``.

The receiver runs this backwards. In expectation the net cost of a chunk is its T-step
negative ELBO. Latents live on a grid shared by sender and receiver: ``z_s = mu_p + sigma delta
k`` for integer ``k``, with ``mu_p``, ``sigma`` the mean and std of ``p(z_s | z_t)`` (which
``q(z_s | z_t, x)`` shares) and ``delta = 2^-grid_bits``; ``z_1`` uses the prior's grid. On
that grid ``p`` is a quantised standard Gaussian and ``q`` a shifted one, both over +-8 std.

Initial bits: the first chunk's decodes need bits that are not there yet, so the stack starts
with ``init_words`` seeded random words (about ``chunk x D x (T + 1) x (grid_bits + 2)`` bits);
they are part of the file, reported as overhead, paid once per file and amortised over its
images. The receiver checks that exactly those words remain after decoding.

Determinism: the receiver must recompute the sender's probabilities bit for bit. Both run the
model in float64 on the CPU with one thread (so no reduction changes order), deterministic
algorithms, and the pure-PyTorch reference formulas; any other device is refused.
"""

import argparse
import hashlib
import json
import math
import struct
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vdm_fast._extras import require

require("compress")  # a one-line message, not an ImportError, without the extra

from tqdm import tqdm

from vdm_fast.reference.loss import alpha_sigma, decoder_logits, encode as encode_data

MAGIC = b"VDMZ"
VERSION = 1
# The grid covers +-8 std of p around its mean. The coder gives every grid point at least 2^-24
# of probability; that floor, spread over all 2 * 8 * 2^grid_bits points, must stay negligible
# (over +-16 std at 2^-8 it widened the sampled latents by 2 % and cost 5 % of rate).
_RANGE_STDS = 8


class CodecError(ValueError):
    """A stream that cannot be decoded into the right images: refused, never guessed."""


@dataclass
class Header:
    version: int
    fingerprint: str
    T: int
    shape: list  # [N, C, H, W]
    vocab_size: int
    chunk: int
    grid_bits: int
    init_words: int
    init_seed: int
    payload_words: int


def fingerprint(model) -> str:
    """SHA-256 of the model's parameters (as float64) and of the settings that shape the code."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([model.vocab_size, list(model.image_shape)]).encode())
    return h.hexdigest()


@contextmanager
def exact_arithmetic():
    """One thread and deterministic algorithms while coding; restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _coding_model(model):
    """The model as the codec runs it: a float64 copy on the CPU, in eval mode."""
    import copy

    return copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()


class _Chain:
    """The T-step chain of one chunk: schedule on the grid, and the step distributions."""

    def __init__(self, model, T: int):
        self.model, self.T = model, T
        grid = torch.arange(T, -1, -1, dtype=torch.float64) / T  # 1, (T-1)/T, ..., 0
        with torch.no_grad():
            self.gammas = model.gamma(grid)[0].detach()

    def step(self, z_t, i):
        """For step i (t = (T - i)/T, s = t - 1/T): mean of p(z_s | z_t), the shared std, and
        the coefficients that turn a data image into the mean of q(z_s | z_t, x)."""
        g_t, g_s = self.gammas[i], self.gammas[i + 1]
        n = z_t.shape[0]
        with torch.no_grad():
            eps_hat = self.model.score_net(z_t, g_t.expand(n))
        c = -torch.expm1(g_s - g_t)
        alpha_t, sigma_t = alpha_sigma(g_t)
        alpha_s, sigma_s = alpha_sigma(g_s)
        mu_p = (alpha_s / alpha_t) * (z_t - sigma_t * c * eps_hat)
        std = torch.sqrt(sigma_s**2 * c)
        return mu_p, std, (alpha_s / alpha_t, sigma_t * c, alpha_t, sigma_t)

    @staticmethod
    def q_mean(z_t, f, coef):
        ratio, sc, alpha_t, sigma_t = coef
        eps = (z_t - alpha_t * f) / sigma_t  # the true noise, given x
        return ratio * (z_t - sc * eps)


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).numpy().astype(np.float64)


class _Coder:
    """The ANS stack and the two quantised-Gaussian views of a latent grid."""

    def __init__(self, words, grid_bits, seal):
        from constriction import stream

        self.stream = stream
        # The sender seals the initial words (so trailing zero words survive); the receiver
        # unseals what is left at the end and compares it with them.
        self.ans = stream.stack.AnsCoder(words, seal=seal)
        self.delta = 2.0 ** -grid_bits
        self.K = int(_RANGE_STDS / self.delta)
        self.gauss = stream.model.QuantizedGaussian(-self.K, self.K)

    def pop_q(self, offset_in_stds, std_ratio):
        """Decode grid indices under q: mean ``offset`` and std ``std_ratio`` in units of p's std."""
        return self.ans.decode(self.gauss, _flat(offset_in_stds / self.delta),
                               _flat(std_ratio / self.delta)).astype(np.int64)

    def push_q(self, k, offset_in_stds, std_ratio):
        self.ans.encode_reverse(k.astype(np.int32), self.gauss, _flat(offset_in_stds / self.delta),
                                _flat(std_ratio / self.delta))

    def pop_p(self, count):
        return self.ans.decode(self.gauss, np.zeros(count), np.full(count, 1.0 / self.delta)).astype(np.int64)

    def push_p(self, k):
        self.ans.encode_reverse(k.astype(np.int32), self.gauss, np.zeros(k.size), np.full(k.size, 1.0 / self.delta))

    def push_x(self, x, probs):
        self.ans.encode_reverse(x.astype(np.int32), self.stream.model.Categorical(perfect=False), probs)

    def pop_x(self, probs):
        return self.ans.decode(self.stream.model.Categorical(perfect=False), probs).astype(np.int64)


def _x_probs(model, z_0, gamma_0):
    alpha_0, _ = alpha_sigma(gamma_0)
    logits = decoder_logits(z_0 / alpha_0, gamma_0.expand(z_0.shape[0]), model.vocab_size)
    return torch.softmax(logits, dim=-1).reshape(-1, model.vocab_size).numpy()


def _encode_chunk(coder, chain, x):
    """Sender: take the latents off the stack under q, then put x and the latents on under p."""
    model = chain.model
    f = encode_data(x, model.vocab_size, torch.float64)
    alpha_1, sigma_1 = alpha_sigma(chain.gammas[0])
    k1 = coder.pop_q(alpha_1 * f, sigma_1.expand_as(f))  # prior grid: mean 0, std 1
    z = torch.from_numpy(k1 * coder.delta).reshape(f.shape)
    ks = []
    for i in range(chain.T):
        mu_p, std, coef = chain.step(z, i)
        k = coder.pop_q((chain.q_mean(z, f, coef) - mu_p) / std, torch.ones_like(f))
        ks.append(k)
        z = mu_p + std * coder.delta * torch.from_numpy(k).reshape(f.shape)
    coder.push_x(x.reshape(-1).numpy(), _x_probs(model, z, chain.gammas[-1]))
    for k in reversed(ks):
        coder.push_p(k)
    coder.push_p(k1)


def _decode_chunk(coder, chain, shape):
    """Receiver: the sender's steps in reverse."""
    model = chain.model
    count = math.prod(shape)
    k1 = coder.pop_p(count)
    z = torch.from_numpy(k1 * coder.delta).reshape(shape)
    steps = []
    for i in range(chain.T):
        mu_p, std, coef = chain.step(z, i)
        k = coder.pop_p(count)
        steps.append((z, k, mu_p, std, coef))
        z = mu_p + std * coder.delta * torch.from_numpy(k).reshape(shape)
    x = torch.from_numpy(coder.pop_x(_x_probs(model, z, chain.gammas[-1]))).reshape(shape)
    f = encode_data(x, model.vocab_size, torch.float64)
    for z_t, k, mu_p, std, coef in reversed(steps):
        coder.push_q(k, (chain.q_mean(z_t, f, coef) - mu_p) / std, torch.ones_like(f))
    alpha_1, sigma_1 = alpha_sigma(chain.gammas[0])
    coder.push_q(k1, alpha_1 * f, sigma_1.expand_as(f))
    return x


def _init_words(header: Header) -> np.ndarray:
    rng = np.random.default_rng(header.init_seed)
    return rng.integers(0, 2**32, header.init_words, dtype=np.uint32)


def encode(model, images, T: int = 100, chunk: int = 1, grid_bits: int = 6, progress: bool = False) -> bytes:
    """Compress integer images ``[N, C, H, W]`` in ``[0, vocab)`` into a self-checking byte string."""
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[0] == 0:
        raise CodecError(f"images must be a non-empty [N, C, H, W] batch, got shape {tuple(images.shape)}")
    if tuple(images.shape[1:]) != tuple(model.image_shape):
        raise CodecError(f"images must be [N, {', '.join(map(str, model.image_shape))}] for this model, "
                         f"got {tuple(images.shape)}")
    if images.is_floating_point() or images.min() < 0 or images.max() >= model.vocab_size:
        raise CodecError(f"images must be integers in [0, {model.vocab_size})")
    for name, value, low in (("T", T, 1), ("chunk", chunk, 1), ("grid_bits", grid_bits, 2)):
        if not isinstance(value, int) or value < low:
            raise CodecError(f"{name} must be an int >= {low}, got {value!r}")
    if grid_bits > 10:
        raise CodecError(f"grid_bits must be <= 10: the coder's 24-bit probabilities cannot resolve a finer "
                         f"grid exactly enough, got {grid_bits}")
    net = _coding_model(model)
    D = math.prod(net.image_shape)
    # Enough initial bits for one chunk's decodes: about grid_bits + log2(sqrt(2 pi e)) each.
    init_bits = min(chunk, len(images)) * D * (T + 1) * (grid_bits + 3) + 256
    header = Header(VERSION, fingerprint(net), T, list(images.shape), net.vocab_size, chunk, grid_bits,
                    init_words=math.ceil(init_bits / 32), init_seed=int(torch.randint(0, 2**31, ()).item()),
                    payload_words=0)
    with exact_arithmetic():
        chain = _Chain(net, T)
        coder = _Coder(_init_words(header), grid_bits, seal=True)
        starts = range(0, len(images), chunk)
        for start in tqdm(starts, desc="encode", disable=not progress):
            _encode_chunk(coder, chain, images[start:start + chunk].long())
        payload = coder.ans.get_compressed()
    header.payload_words = int(payload.size)
    return _pack(header, payload)


def decode(model, data: bytes, progress: bool = False) -> torch.Tensor:
    """The images (int64 ``[N, C, H, W]``) of a byte string made by ``encode`` with this model."""
    header, payload = _unpack(data)
    net = _coding_model(model)
    if header.fingerprint != fingerprint(net):
        raise CodecError("this stream was made with another model (fingerprint mismatch): "
                         "decode it with the checkpoint that encoded it")
    N, C, H, W = header.shape
    if [C, H, W] != list(net.image_shape) or header.vocab_size != net.vocab_size:
        raise CodecError(f"the stream holds {header.vocab_size}-level images of shape {[C, H, W]}, this model "
                         f"codes {net.vocab_size}-level images of shape {list(net.image_shape)}")
    with exact_arithmetic():
        chain = _Chain(net, header.T)
        starts = list(range(0, N, header.chunk))
        chunks = []
        try:
            coder = _Coder(payload, header.grid_bits, seal=False)
            for start in tqdm(reversed(starts), total=len(starts), desc="decode", disable=not progress):
                chunks.append(_decode_chunk(coder, chain, (min(header.chunk, N - start), C, H, W)))
            rest = coder.ans.get_compressed(unseal=True)
        except (ValueError, RuntimeError, AssertionError, TypeError, OverflowError, IndexError) as err:
            # constriction refuses what a damaged stream makes it do (e.g. unsealing a stack
            # whose last word is zero): a decoding failure, never a crash.
            raise CodecError(f"the stream could not be decoded ({type(err).__name__}: {err}): it is damaged "
                             "or was made with a different model") from err
    if not np.array_equal(rest, _init_words(header)):
        raise CodecError("decoding did not return the stream to its initial words: the stream is "
                         "damaged or was decoded with different arithmetic")
    return torch.cat(chunks[::-1])


# --- container: magic, version, header length, JSON header, payload, SHA-256 of all before it ---

def _pack(header: Header, payload: np.ndarray) -> bytes:
    head = json.dumps(asdict(header), sort_keys=True).encode()
    body = MAGIC + struct.pack("<HI", VERSION, len(head)) + head + payload.astype("<u4").tobytes()
    return body + hashlib.sha256(body).digest()


# The header's fields: (type, lowest, highest). A stream is refused unless every field is of
# its type and range, so a tampered header (even under a recomputed checksum) cannot make the
# decoder allocate without bound or fail with anything but a CodecError.
_HEADER_FIELDS = {"version": (int, VERSION, VERSION), "fingerprint": (str, None, None), "T": (int, 1, 100_000),
                  "shape": (list, None, None), "vocab_size": (int, 2, 2**16), "chunk": (int, 1, 2**31),
                  "grid_bits": (int, 2, 10), "init_words": (int, 0, 2**40), "init_seed": (int, 0, 2**63),
                  "payload_words": (int, 0, 2**40)}
# Probabilities of one chunk's pixels are held at once: chunk x D x vocab float64 values.
_MAX_CHUNK_PROBS = 2**28


def _check_header(fields) -> Header:
    if not isinstance(fields, dict) or set(fields) != set(_HEADER_FIELDS):
        raise CodecError("the stream's header does not have the fields of this format")
    for name, (kind, low, high) in _HEADER_FIELDS.items():
        value = fields[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CodecError(f"the stream's header has an invalid {name} ({kind.__name__} expected)")
        if low is not None and not low <= value <= high:
            raise CodecError(f"the stream's header has {name} = {value}, outside [{low}, {high}]")
    shape = fields["shape"]
    if len(shape) != 4 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 2**31 for s in shape):
        raise CodecError(f"the stream's header has an invalid shape {shape!r} ([N, C, H, W] expected)")
    if min(fields["chunk"], shape[0]) * math.prod(shape[1:]) * fields["vocab_size"] > _MAX_CHUNK_PROBS:
        raise CodecError("the stream's header asks for chunks larger than this decoder holds")
    if fields["init_words"] > fields["payload_words"]:
        raise CodecError("the stream's header claims more initial words than its payload holds")
    # Every image costs far more than one bit: a header claiming more images than the payload
    # has bits is tampered with (and would keep the decoder busy without end).
    if shape[0] > 32 * fields["payload_words"]:
        raise CodecError(f"the stream's header claims {shape[0]} images, more than its payload could hold")
    return Header(**fields)


def _unpack(data: bytes):
    if len(data) < len(MAGIC) + 6 + 32 or data[:4] != MAGIC:
        raise CodecError("not a vdm_fast compressed stream (bad magic or too short)")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise CodecError("checksum mismatch: the stream is corrupted or truncated")
    version, head_len = struct.unpack("<HI", body[4:10])
    if version != VERSION:
        raise CodecError(f"stream format version {version} is not supported (this is version {VERSION})")
    if 10 + head_len > len(body):
        raise CodecError("the stream's header length runs past its end")
    try:
        fields = json.loads(body[10:10 + head_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CodecError(f"the stream's header is not valid JSON ({err})") from err
    header = _check_header(fields)
    if (len(body) - 10 - head_len) % 4:
        raise CodecError("the stream's payload is not a whole number of 32-bit words")
    payload = np.frombuffer(body[10 + head_len:], dtype="<u4").astype(np.uint32)
    if payload.size != header.payload_words:
        raise CodecError("stream length does not match its header: truncated or padded")
    return header, payload


def rate_report(data: bytes, n_images: int, dims: int) -> dict:
    """Bits per dim of a stream: total, and net of the initial-bits overhead."""
    header, _ = _unpack(data)
    total_bits = 8 * len(data)
    overhead_bits = 8 * (len(data) - 4 * header.payload_words) + 32 * header.init_words
    return {"total_bpd": total_bits / (n_images * dims), "net_bpd": (total_bits - overhead_bits) / (n_images * dims),
            "overhead_bits": overhead_bits}


def main(argv=None):
    from vdm_fast.checkpoint import CheckpointError, model_from_checkpoint

    parser = argparse.ArgumentParser(prog="python -m vdm_fast.compress", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="images.npy (uint8 [N, H, W, C]) -> stream")
    enc.add_argument("--T", type=int, default=100, help="diffusion steps of the discrete-time model")
    enc.add_argument("--chunk", type=int, default=1, help="images coded together (faster, more initial bits)")
    enc.add_argument("--grid-bits", type=int, default=6, help="latent grid: 2^-bits of a step's std")
    dec = sub.add_parser("decode", help="stream -> images.npy (uint8 [N, H, W, C])")
    for p in (enc, dec):
        p.add_argument("--ckpt", required=True)
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        model, _, _ = model_from_checkpoint(args.ckpt)
        if args.command == "encode":
            try:
                array = np.load(args.input, allow_pickle=False)
            except (ValueError, EOFError) as err:
                raise CodecError(f"{args.input} is not a .npy array of images ({err})") from err
            if not isinstance(array, np.ndarray):  # an .npz archive
                raise CodecError(f"{args.input} is an .npz archive; encode takes one .npy array of uint8 images "
                                 "[N, H, W, C]")
            if array.dtype != np.uint8 or array.ndim != 4:
                raise CodecError(f"{args.input} must hold uint8 images [N, H, W, C], got {array.dtype} {array.shape}")
            images = torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))
            data = encode(model, images, T=args.T, chunk=args.chunk, grid_bits=args.grid_bits, progress=True)
            Path(args.output).write_bytes(data)
            report = rate_report(data, len(images), math.prod(model.image_shape))
            print(f"{len(images)} images -> {len(data)} bytes: {report['total_bpd']:.4f} bpd in all, "
                  f"{report['net_bpd']:.4f} bpd net of {report['overhead_bits']} bits of initial overhead")
        else:
            images = decode(model, Path(args.input).read_bytes(), progress=True)
            np.save(args.output, images.permute(0, 2, 3, 1).numpy().astype(np.uint8))
            print(f"decoded {len(images)} images to {args.output}")
    except (CodecError, CheckpointError, OSError, ValueError) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
