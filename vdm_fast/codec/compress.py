"""Bits-back lossless compression of integer images with a trained VDM (BB-ANS, bit-swap order).

    python -m vdm_fast.codec.compress encode --ckpt CKPT --input images.npy --output out.vdmz [--T 100]
    python -m vdm_fast.codec.compress decode --ckpt CKPT --input out.vdmz --output images.npy

The model is the T-step discrete-time VDM; a bits-back chunk costs about its T-step negative
ELBO (what ``python -m vdm_fast.training.evaluate --T`` reports); a class-conditional model codes the images
under its unconditional p(x), the null class's. There are no seeded initial bits: the
first images are coded directly, without bits back, until the stack can lend them, so a small
file costs noticeably more than its bound and a large one approaches it. The coding itself
(``vdm_fast.codec.bitsback``) runs the model in float64 on the CPU, on all threads, and builds its
distributions so that another CPU decodes the file (see that module's notes).

Stream (version 3): ``VDMZ``, the version (uint16), the header as LEB128 integers (T, N, C, H,
W, vocab, max_chunk, grid_bits), 4 bytes of model fingerprint, 4 bytes of image digest, the ANS
payload (little-endian uint32 words), and 4 bytes of SHA-256 over all that came before. (32-bit
checks, as gzip, PNG and zstd use: on a small file each byte is a visible share of its size.)
"""

import argparse
import copy
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vdm_fast.extras import require

require("compress")  # a one-line message, not an ImportError, without the extra

from tqdm import tqdm

from vdm_fast.codec import bitsback
# The coder's error is the codec's: one exception for a caller to catch.
from vdm_fast.codec.bitsback import CodecError

MAGIC = b"VDMZ"
VERSION = 3  # 2: images before bits-back coded uniformly, 8-byte checks
_FINGERPRINT_BYTES, _DIGEST_BYTES, _CHECKSUM_BYTES = 4, 4, 4
# A chunk's hint symbols range over 2 x chunk x D, within the coder's 2^24 alphabet; its pixel
# distributions are chunk x D x vocab float64 values, held at once (2^28: 2 GiB).
_MAX_CHUNK_DIMS = 2**23
_MAX_CHUNK_PROBS = 2**28


def _check_chunk(max_chunk: int, dims: int, vocab: int, what: str) -> None:
    if max_chunk * dims > _MAX_CHUNK_DIMS or max_chunk * dims * vocab > _MAX_CHUNK_PROBS:
        raise CodecError(f"{what}: max_chunk x dims must be <= {_MAX_CHUNK_DIMS} and max_chunk x dims x vocab "
                         f"<= {_MAX_CHUNK_PROBS}, got {max_chunk} x {dims} x {vocab}")


@dataclass
class Header:
    T: int
    shape: tuple  # (N, C, H, W)
    vocab_size: int
    max_chunk: int
    grid_bits: int
    fingerprint: bytes
    digest: bytes


def coding_model(model):
    """The model as the codec runs it: a float64 copy on the CPU, in eval mode."""
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()


def fingerprint(model, chain: bitsback.Chain) -> bytes:
    """SHA-256 (first 4 bytes) of the model's parameters as float64 and of the chain's constants:
    a stream decodes only with the same model, and on a machine that rounds its schedule alike."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
    h.update(repr([model.vocab_size, list(model.image_shape)]).encode())
    h.update(chain.digest())
    return h.digest()[:_FINGERPRINT_BYTES]


def image_digest(images: torch.Tensor) -> bytes:
    h = hashlib.sha256(repr(list(images.shape)).encode())
    h.update(images.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return h.digest()[:_DIGEST_BYTES]


def encode(model, images, T: int = 100, max_chunk: int = 32, grid_bits: int = 4, progress: bool = False,
           chunks: list = None) -> bytes:
    """Compress integer images ``[N, C, H, W]`` in ``[0, vocab)`` into a self-checking byte string.

    ``max_chunk`` images at most are coded together (one batched network call per step); the
    chunks start small and grow as the stack can lend them bits. ``grid_bits``: each latent lives
    on a grid of ``2^-grid_bits`` of its step's std (a coarser grid borrows fewer bits, so
    bits-back starts sooner; docs/guide/compression.md, "How it works"). A list passed as
    ``chunks`` receives the chunk sizes in coding order (0: an image of the direct block, coded before the
    stack could lend bits).
    """
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[0] == 0:
        raise CodecError(f"images must be a non-empty [N, C, H, W] batch, got shape {tuple(images.shape)}")
    if tuple(images.shape[1:]) != tuple(model.image_shape):
        raise CodecError(f"images must be [N, {', '.join(map(str, model.image_shape))}] for this model, "
                         f"got {tuple(images.shape)}")
    if images.is_floating_point() or images.min() < 0 or images.max() >= model.vocab_size:
        raise CodecError(f"images must be integers in [0, {model.vocab_size})")
    for name, value, low, high in (("T", T, 1, 100_000), ("max_chunk", max_chunk, 1, 4096),
                                   ("grid_bits", grid_bits, 1, 8)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise CodecError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    D = math.prod(model.image_shape)
    _check_chunk(max_chunk, D, model.vocab_size, "max_chunk is too large for these images")
    net = coding_model(model)
    chain = bitsback.Chain(net, T, grid_bits)
    x = images.reshape(len(images), D).long().numpy()
    coder = bitsback.Coder()
    per_image = chain.bits_per_image()
    # The first images, coded directly, until the stack holds what a one-image chunk borrows (a
    # chunk's worth at most: their distributions are held at once).
    done, probs = bitsback.direct_block(chain, x[:max_chunk], per_image + 64)
    bitsback.encode_direct(coder, x[:done], probs)
    if chunks is not None:
        chunks.extend([0] * done)
    last = 0
    with tqdm(total=len(x), initial=done, desc="encode", unit="img", disable=not progress) as bar:
        while done < len(x):
            # As many images as the stack can lend bits for (a chunk that finds it a little
            # short still decodes exactly; its pops then cost more).
            size = min(max_chunk, len(x) - done, max(1, (coder.bits() - 64) // per_image))
            coder.push_size(last, size, max_chunk)  # the previous chunk's size, told with this one's
            try:
                bitsback.encode_chunk(coder, chain, x[done:done + size])
            except CodecError as err:
                raise CodecError(f"images {done}..{done + size - 1}: {err}") from err
            if chunks is not None:
                chunks.append(size)
            done += size
            last = size
            bar.update(size)
        coder.push_size(last, None, max_chunk)
    header = Header(T, tuple(images.shape), net.vocab_size, max_chunk, grid_bits, fingerprint(net, chain),
                    image_digest(images))
    return _pack(header, coder.ans.get_compressed())


def decode(model, data: bytes, progress: bool = False) -> torch.Tensor:
    """The images (int64 ``[N, C, H, W]``) of a byte string made by ``encode`` with this model."""
    header, payload = _unpack(data)
    net = coding_model(model)
    N, C, H, W = header.shape
    if [C, H, W] != list(net.image_shape) or header.vocab_size != net.vocab_size:
        raise CodecError(f"the stream holds {header.vocab_size}-level images of shape {[C, H, W]}, this model "
                         f"codes {net.vocab_size}-level images of shape {list(net.image_shape)}")
    chain = bitsback.Chain(net, header.T, header.grid_bits)
    if header.fingerprint != fingerprint(net, chain):
        raise CodecError("this stream was made with another model (fingerprint mismatch), or this machine "
                         "computes the model's coding constants differently: decode it with the checkpoint "
                         "that encoded it")
    chunks, left = [], N
    try:
        coder = bitsback.Coder(payload)
        with tqdm(total=N, desc="decode", unit="img", disable=not progress) as bar:
            size = coder.pop_size(None, header.max_chunk)
            while left:  # the chunks come off the stack last to first, the direct block (0) last
                if size > left:
                    raise CodecError(f"the stream holds a chunk of {size} images where {left} remain")
                chunk = bitsback.decode_direct(coder, chain, left) if size == 0 else \
                    bitsback.decode_chunk(coder, chain, size)
                chunks.append(chunk)
                left -= len(chunk)
                bar.update(len(chunk))
                if left:
                    size = coder.pop_size(size, header.max_chunk)
        empty = coder.ans.is_empty()
    except CodecError:
        raise
    except (ValueError, RuntimeError, AssertionError, TypeError, OverflowError, LookupError) as err:
        # constriction refuses what a damaged stream makes it do: a decoding failure, never a crash.
        raise CodecError(f"the stream could not be decoded ({type(err).__name__}: {err}): it is damaged "
                         "or was made with a different model") from err
    images = torch.from_numpy(np.concatenate(chunks[::-1])).reshape(N, C, H, W)
    if not empty or image_digest(images) != header.digest:
        raise CodecError("the decoded images do not match the stream's digest: the stream is damaged or "
                         "this machine's arithmetic differs from the encoder's")
    return images


# --- container ---------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int):
    value = 0
    for shift in range(0, 63, 7):
        if pos >= len(data):
            raise CodecError("the stream's header runs past its end")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise CodecError("the stream's header holds an integer longer than 63 bits")


def _checksum(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()[:_CHECKSUM_BYTES]


def _pack(header: Header, payload: np.ndarray) -> bytes:
    fields = [header.T, *header.shape, header.vocab_size, header.max_chunk, header.grid_bits]
    body = (MAGIC + VERSION.to_bytes(2, "little") + b"".join(map(_varint, fields)) + header.fingerprint
            + header.digest + payload.astype("<u4").tobytes())
    return body + _checksum(body)


# The header's integers and their ranges. A stream is refused unless each is in range, so a
# tampered header (even under a recomputed checksum) cannot make the decoder allocate without
# bound or fail with anything but a CodecError.
_FIELDS = (("T", 1, 100_000), ("N", 1, 2**31), ("C", 1, 2**16), ("H", 1, 2**16), ("W", 1, 2**16),
           ("vocab_size", 2, 2**16), ("max_chunk", 1, 4096), ("grid_bits", 1, 8))


def _unpack(data: bytes):
    if len(data) < len(MAGIC) + 2 + _CHECKSUM_BYTES or data[:4] != MAGIC:
        raise CodecError("not a vdm_fast compressed stream (bad magic or too short)")
    body, checksum = data[:-_CHECKSUM_BYTES], data[-_CHECKSUM_BYTES:]
    if _checksum(body) != checksum:
        raise CodecError("checksum mismatch: the stream is corrupted or truncated")
    version = int.from_bytes(body[4:6], "little")
    if version != VERSION:
        raise CodecError(f"stream format version {version} is not supported by this vdm_fast (it reads version "
                         f"{VERSION}); decode it with the vdm_fast release that wrote it")
    pos, values = 6, {}
    for name, low, high in _FIELDS:
        values[name], pos = _read_varint(body, pos)
        if not low <= values[name] <= high:
            raise CodecError(f"the stream's header has {name} = {values[name]}, outside [{low}, {high}]")
    end = pos + _FINGERPRINT_BYTES + _DIGEST_BYTES
    if end > len(body) or (len(body) - end) % 4:
        raise CodecError("the stream's payload is not a whole number of 32-bit words")
    payload = np.frombuffer(body[end:], dtype="<u4").astype(np.uint32)
    shape = tuple(values[k] for k in "NCHW")
    dims = shape[1] * shape[2] * shape[3]
    _check_chunk(values["max_chunk"], dims, values["vocab_size"], "the stream's header asks for chunks larger "
                 "than this decoder holds")
    # Every image costs more than a bit: a header claiming more images than the payload has
    # bits is tampered with (and would keep the decoder busy without end).
    if shape[0] > 32 * payload.size:
        raise CodecError(f"the stream's header claims {shape[0]} images, more than its payload could hold")
    header = Header(values["T"], shape, values["vocab_size"], values["max_chunk"], values["grid_bits"],
                    body[pos:pos + _FINGERPRINT_BYTES], body[pos + _FINGERPRINT_BYTES:end])
    return header, payload


def rate_report(data: bytes, n_images: int, dims: int) -> dict:
    """Bits per dim of a stream: the whole file, and the ANS payload alone."""
    _, payload = _unpack(data)
    return {"total_bpd": 8 * len(data) / (n_images * dims), "payload_bpd": 32 * payload.size / (n_images * dims),
            "container_bits": 8 * len(data) - 32 * payload.size}


def main(argv=None, prog=None):
    """The command line (``prog``: the program name of its usage lines, ``vdm-fast COMMAND`` under the
    ``vdm-fast`` console command)."""
    from vdm_fast.io import CheckpointError, load_model

    parser = argparse.ArgumentParser(prog=prog or "python -m vdm_fast.codec.compress", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="images.npy (uint8 [N, H, W, C]) -> stream")
    enc.add_argument("--T", type=int, default=100, help="diffusion steps of the discrete-time model")
    enc.add_argument("--max-chunk", type=int, default=32, help="images coded together at most (one batched "
                     "network call per step)")
    enc.add_argument("--grid-bits", type=int, default=4, help="latent grid: 2^-bits of a step's std")
    dec = sub.add_parser("decode", help="stream -> images.npy (uint8 [N, H, W, C])")
    for p in (enc, dec):
        p.add_argument("--ckpt", required=True,
                       help="checkpoint.pt of a training run, or a folder written by vdm-fast export or vdm-fast convert")
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        model, _, _ = load_model(args.ckpt)
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
            data = encode(model, images, T=args.T, max_chunk=args.max_chunk, grid_bits=args.grid_bits,
                          progress=True)
            Path(args.output).write_bytes(data)
            report = rate_report(data, len(images), math.prod(model.image_shape))
            print(f"{len(images)} images -> {len(data)} bytes: {report['total_bpd']:.4f} bits per dim "
                  f"({report['container_bits']} bits of header and checksum)")
        else:
            images = decode(model, Path(args.input).read_bytes(), progress=True)
            np.save(args.output, images.permute(0, 2, 3, 1).numpy().astype(np.uint8))
            print(f"decoded {len(images)} images to {args.output}")
    except (CodecError, CheckpointError, OSError, ValueError) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
