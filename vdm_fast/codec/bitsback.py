"""The bits-back coder behind ``vdm_fast.codec.compress``: one ANS stack, chunks of images, the T-step
VDM chain in bit-swap order, and distributions that every machine builds bit for bit alike.

Bit-swap order (Kingma, Abbeel and Ho, 2019). The forward process is a Markov chain, so the
inference model factorises as ``q(z_0 | x) prod_i q(z_i | z_{i-1})`` (``z_i`` at ``t = i / T``).
Per chunk the sender interleaves one take and one give per step::

    pop z_0 ~ q(z_0 | x),          push x under p(x | z_0)
    pop z_i ~ q(z_i | z_{i-1}),    push z_{i-1} under p(z_{i-1} | z_i)     for i = 1 .. T
    push z_T under p(z_1) = N(0, I)

so the stack never lends more than about two steps' worth of latent bits, where the textbook
order (all pops first) needs ``T + 1`` steps' worth. In expectation a chunk costs its T-step
negative ELBO. The first images of a file have no stack to borrow from: they are coded directly,
as one block, until the stack holds enough bits for a bits-back chunk, and chunks then grow with
the stack up to ``max_chunk`` images. Each chunk is followed on the stack by its size, so the
receiver, which meets the chunks last to first, knows each one.

The direct block. Its cost above the bound is most of a small file's overhead, so it is coded
with the best model that needs no bits back at hand: the network's guess of the image at
``z_1 = 0`` (about the data's mean image), as a bump of std 1/3 of the value range around each
pixel's guess, times the counts of the values coded so far (an adaptive histogram): most
pixels lie near the mean image, and the counts learn the file's own histogram, so both cost less
than a uniform code of log2(vocab) bits a pixel (the figures: benchmarks/RESULTS.md).

Lattices. ``z_i`` lives on ``delta_i Z^D``, with ``delta_i`` a ``2^-grid_bits`` fraction of the
smaller of the two stds it is coded with (popped under ``q``, pushed under ``p``). A latent is
coded as its offset from the integer nearest below the distribution's mean, over +-``_RANGE``
stds; one beyond that (a poor model) escapes: the boundary symbol, then the excess in 32 raw bits.

Portability. The receiver must rebuild every distribution the sender used, bit for bit, on
another CPU (AVX2 or AVX-512, another BLAS or thread count) whose network outputs differ in the
last bits. So the distributions are functions of exact values only:

- the latents are integers on fixed lattices, so the network's inputs are identical;
- the per-step constants come from the schedule rounded to ``_SCALAR_BITS`` significant bits
  (and are part of the stream's fingerprint, so a machine that rounds one differently refuses
  the stream instead of misdecoding it);
- the network's ``eps_hat`` is rounded to a ``2^-_EPS_BITS`` grid; where a value lies within
  ``_MARGIN`` of a rounding boundary (float64 outputs differ across machines in their last
  bits, far inside the margin) the sender records which way it rounded, as a hint on the
  stack; a receiver whose own value is near a boundary that the sender did not flag stops with
  an error;
- everything after that is IEEE arithmetic (``+ - * /``, floor), the decoder's ``exp`` is a
  polynomial in those (numpy's ``exp`` picks SIMD code by CPU), and ``constriction`` builds
  its integer distributions in portable code.
"""

import hashlib
import math

import numpy as np
import torch

from vdm_fast.diffusion.pixels import encode as encode_data

# Latents are coded over +-_RANGE stds around the mean; beyond that they escape. Each grid point
# in range gets at least 2^-24 of probability (constriction's floor), so the range is kept
# small: the floor's total mass, 2 * 8 * 2^grid_bits points, costs ~1e-4 bits a latent.
_RANGE = 8
_ESCAPE_BITS = 16  # the escaped excess is pushed as two 16-bit halves
# eps_hat is rounded to multiples of 2^-_EPS_BITS (its error moves a mean by < 2^-11 of a std).
_EPS_BITS = 16
# Values within _MARGIN of a rounding boundary are hinted. 2^-40 sits well above the differences
# between CPU capabilities (float64 outputs that differ in their last bits), and flags 2^-23 of
# the values. Each hint costs ~30 bits (one symbol over 2 x chunk x D, and a nonzero count; a
# step's count is coded with P(0) = 1 - 2^-10, 0.0014 bits), so every doubling of the margin
# doubles a cost that long files pay on every step: the margin is kept as narrow as that safety
# allows.
_MARGIN = 2.0**-40
_MAX_HINTS = 255
# Per-step constants: the schedule's gamma rounded to 2^-32, derived constants to 40 bits.
_GAMMA_BITS = 32
_SCALAR_BITS = 40
# The direct block's model: the mean-image guess rounded to 2^-_GUESS_BITS, a bump of precision
# 1 / (2/3)^2 around it (std: a third of [-1, 1]), adaptive counts starting at 1/2 (KT).
_GUESS_BITS = 12
_BUMP_PRECISION = 2.25
_COUNT_PRIOR = 0.5


class CodecError(ValueError):
    """A stream that cannot be decoded into the right images, or images that the chain cannot
    code: refused, never guessed (``vdm_fast.codec.compress.CodecError``)."""


def _round_sig(x: float, bits: int = _SCALAR_BITS) -> float:
    """``x`` rounded to ``bits`` significant bits: exact Python float arithmetic."""
    if x == 0.0:
        return 0.0
    mantissa, exponent = math.frexp(x)
    return math.ldexp(round(mantissa * 2**bits), exponent - bits)


_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # Cody-Waite split
_INV_FACT = [1.0 / math.factorial(k) for k in range(14)]


def portable_exp(x: np.ndarray) -> np.ndarray:
    """``exp(x)`` for ``x <= 0`` to ~1e-16 relative, from IEEE ``+ - *`` and ``floor`` only, so the
    same on every CPU (``np.exp`` is not: it dispatches to SIMD code by instruction set)."""
    x = np.maximum(x, -700.0)
    n = np.floor(x * (1.0 / math.log(2.0)) + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO  # |r| <= 0.35
    p = np.full_like(r, _INV_FACT[13])
    for c in reversed(_INV_FACT[:13]):
        p = p * r + c
    return np.ldexp(p, n.astype(np.int64))


def _eps_hat(model, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The model's noise prediction at ``(z, gamma)``, whatever its network predicts (x, v and
    score converted to eps, as the bound does). A class-conditional model codes images under
    its unconditional p(x): its network gets the null class (``num_classes``)."""
    null = torch.full((len(z),), model.num_classes, dtype=torch.long) if model.num_classes else None
    return model.predict_eps(z, gamma, null)


class Chain:
    """The per-step constants of the T-step chain of one model, shared by sender and receiver.

    Step i codes z_i: popped under q with mean ``pop_scale[i] * (f or k_{i-1})`` and std
    ``pop_std[i]``, pushed under p with mean ``push_scale[i] * k_{i+1} - push_eps[i] * eps_hat``
    and std ``push_std[i]`` (z_T: mean 0), all in units of z_i's lattice ``delta[i]``.
    """

    def __init__(self, model, T: int, grid_bits: int):
        self.model, self.T = model, T
        self.vocab = model.vocab_size
        times = torch.arange(T + 1, dtype=torch.float64) / T
        with torch.no_grad():
            raw = model.gamma(times)[0].detach().cpu().tolist()
        self.gamma = [round(g * 2**_GAMMA_BITS) / 2**_GAMMA_BITS for g in raw]
        if not all(math.isfinite(g) for g in self.gamma) or any(b <= a for a, b in zip(self.gamma, self.gamma[1:])):
            raise CodecError("the model's noise schedule is not finite and increasing on the T-step grid")
        sig = lambda g: 1.0 / (1.0 + math.exp(-g))  # noqa: E731
        alpha = [math.sqrt(sig(-g)) for g in self.gamma]
        sigma = [math.sqrt(sig(g)) for g in self.gamma]
        # c_i = 1 - SNR_i / SNR_{i-1}: the share of z_i's variance that step i adds.
        c = [None] + [-math.expm1(self.gamma[i - 1] - self.gamma[i]) for i in range(1, T + 1)]
        pop = [sigma[0]] + [sigma[i] * math.sqrt(c[i]) for i in range(1, T + 1)]
        push = [sigma[i] * math.sqrt(c[i + 1]) for i in range(T)] + [1.0]
        delta = [min(a, b) * 2.0**-grid_bits for a, b in zip(pop, push)]
        R = _round_sig
        self.delta = [R(d) for d in delta]
        self.pop_std = [R(pop[i] / delta[i]) for i in range(T + 1)]
        self.push_std = [R(push[i] / delta[i]) for i in range(T + 1)]
        self.pop_scale = [R(alpha[0] / delta[0])] + [
            R(alpha[i] / alpha[i - 1] * delta[i - 1] / delta[i]) for i in range(1, T + 1)]
        self.push_scale = [R(alpha[i] / alpha[i + 1] * delta[i + 1] / delta[i]) for i in range(T)]
        self.push_eps = [R(alpha[i] / alpha[i + 1] * sigma[i + 1] * c[i + 1] / delta[i]) for i in range(T)]
        # p(x | z_0): logit_v = -0.5 * precision * (k_0 * x_scale - centre_v)^2 (reference decoder).
        self.x_scale = R(delta[0] / alpha[0])
        self.x_precision = R(math.exp(-self.gamma[0]))
        self.centres = self.encode(np.arange(self.vocab))
        self.dims = math.prod(model.image_shape)
        # The direct block's bump: x_hat = -(sigma_1 / alpha_1) eps_hat(z_1 = 0), the network's
        # guess of the image before it has seen anything, on a grid so both sides hold it exactly.
        z = torch.zeros(1, *model.image_shape, dtype=torch.float64)
        with torch.no_grad():
            eps = _eps_hat(model, z, torch.full((1,), self.gamma[T], dtype=torch.float64)).reshape(-1).numpy()
        if not np.isfinite(eps).all():
            raise CodecError("the network's noise prediction at z_1 = 0 is not finite")
        guess = np.round(-(sigma[T] / alpha[T]) * eps * 2.0**_GUESS_BITS) * 2.0**-_GUESS_BITS
        self.guess = np.clip(guess, -2.0, 2.0)
        self.bump = portable_exp(-0.5 * _BUMP_PRECISION * np.square(self.centres[None, :] - self.guess[:, None]))

    def digest(self) -> bytes:
        """SHA-256 of every constant: part of the stream's fingerprint."""
        table = [self.gamma, self.delta, self.pop_std, self.push_std, self.pop_scale, self.push_scale,
                 self.push_eps, [self.x_scale, self.x_precision], self.guess]
        return hashlib.sha256(np.array([v for row in table for v in row], dtype="<f8").tobytes()).digest()

    def bits_per_image(self) -> int:
        """Stack bits a bits-back chunk borrows per image: two steps of pops (each ~log2(std
        sqrt(2 pi e)) bits a latent) before their gives come back, and half a bit a latent to
        spare (a pop's cost varies from latent to latent, but the spread of a chunk's total grows
        only as the square root of its latents, inside that spare). A chunk that finds the stack
        short is still decoded exactly; its pops then cost more."""
        entropy = [math.log2(s * math.sqrt(2 * math.pi * math.e)) for s in self.pop_std]
        return int(self.dims * (entropy[0] + max(entropy[1:]) + 0.5))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Integer pixels to the model's inputs in [-1, 1] (IEEE ``+ * /`` only: portable)."""
        return encode_data(torch.from_numpy(x), self.vocab, torch.float64).numpy()

    def push_mean(self, i: int, k_next: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """Mean of p(z_{i-1} | z_i) on z_{i-1}'s lattice, from z_i's lattice point and eps_hat on
        its grid: one formula for sender and receiver, which must agree bit for bit."""
        return self.push_scale[i - 1] * k_next - self.push_eps[i - 1] * 2.0**-_EPS_BITS * eps.reshape(-1)

    def eps_hat(self, k: np.ndarray, i: int) -> np.ndarray:
        """The network's noise prediction at z_i = delta_i k (float64, [n, D])."""
        z = torch.from_numpy(k * self.delta[i]).reshape(-1, *self.model.image_shape)
        with torch.no_grad():
            eps = _eps_hat(self.model, z, torch.full((len(z),), self.gamma[i], dtype=torch.float64))
        return eps.reshape(len(z), -1).numpy()

    def direct_probs(self, x: np.ndarray, counts: np.ndarray):
        """The direct model's distributions ([D, vocab]) of one image's pixels ``x`` ([D]) coded in
        order after values that ``counts`` ([vocab]) counts, and the counts after them: exact
        integers in float64 times the bump, so the receiver's one-at-a-time rebuild matches."""
        seen = np.zeros((x.size, self.vocab))
        seen[np.arange(x.size), x] = 1.0
        before = counts + np.cumsum(seen, axis=0) - seen
        return before * self.bump, counts + seen.sum(axis=0)

    def x_probs(self, k0: np.ndarray) -> np.ndarray:
        logits = -0.5 * self.x_precision * np.square(k0.reshape(-1, 1) * self.x_scale - self.centres)
        return portable_exp(logits - logits.max(axis=1, keepdims=True))


class Coder:
    """One ANS stack and the chain's coding steps on it. ``take``/``pop_*`` take bits off
    (decode), ``give_back``/``push_*`` put them on (encode); the receiver runs the sender's calls
    in reverse order, each replaced by its inverse."""

    def __init__(self, words=None):
        from constriction import stream

        self._stream = stream
        self.ans = stream.stack.AnsCoder() if words is None else stream.stack.AnsCoder(words)
        self._gauss = {}
        self._hint_count = stream.model.Categorical(
            np.array([1.0 - 2.0**-10] + [2.0**-10 / _MAX_HINTS] * _MAX_HINTS), perfect=False)
        self._escape = stream.model.Uniform(2**_ESCAPE_BITS)

    def bits(self) -> int:
        return self.ans.num_valid_bits()

    def _model(self, std: float):
        K = int(math.ceil(_RANGE * std)) + 1
        if K not in self._gauss:
            self._gauss[K] = self._stream.model.QuantizedGaussian(-K, K)
        return self._gauss[K], K

    # --- a latent on its lattice, under a Gaussian of mean `mean` and std `std` (lattice units),
    # coded as its offset from floor(mean) by the Gaussian of that offset's model and parameters

    def _offset_model(self, mean: np.ndarray, std: float):
        base = np.floor(mean)
        gauss, K = self._model(std)
        return base.astype(np.int64), K, (gauss, mean - base, np.full(mean.size, std))

    def take(self, mean: np.ndarray, std: float) -> np.ndarray:
        """Bits back: a latent decoded under q. It lies in q's range by construction."""
        base, _, model = self._offset_model(mean, std)
        return base + self.ans.decode(*model)

    def give_back(self, k: np.ndarray, mean: np.ndarray, std: float) -> None:
        """The receiver's inverse of ``take``."""
        base, _, model = self._offset_model(mean, std)
        self.ans.encode_reverse((k - base).astype(np.int32), *model)

    def push_latent(self, k: np.ndarray, mean: np.ndarray, std: float) -> None:
        """A latent encoded under p. One beyond p's range (a poor model) escapes: the range's
        boundary symbol, then the excess in two 16-bit halves."""
        base, K, model = self._offset_model(mean, std)
        j = k - base
        edge = np.flatnonzero(np.abs(j) >= K)
        if edge.size:
            excess = np.abs(j[edge]) - K
            if excess.max() >= 2 ** (2 * _ESCAPE_BITS):
                raise CodecError("a latent lies too far from the model's prediction to be coded")
            self.ans.encode_reverse((excess & (2**_ESCAPE_BITS - 1)).astype(np.int32), self._escape)
            self.ans.encode_reverse((excess >> _ESCAPE_BITS).astype(np.int32), self._escape)
            j[edge] = np.sign(j[edge]) * K
        self.ans.encode_reverse(j.astype(np.int32), *model)

    def pop_latent(self, mean: np.ndarray, std: float) -> np.ndarray:
        """The receiver's inverse of ``push_latent``."""
        base, K, model = self._offset_model(mean, std)
        j = self.ans.decode(*model).astype(np.int64)
        edge = np.flatnonzero(np.abs(j) == K)
        if edge.size:
            hi = self.ans.decode(self._escape, edge.size).astype(np.int64)
            lo = self.ans.decode(self._escape, edge.size).astype(np.int64)
            j[edge] += np.sign(j[edge]) * ((hi << _ESCAPE_BITS) | lo)
        return base + j

    # --- pixels, chunk sizes, hints

    def push_pixels(self, x: np.ndarray, probs: np.ndarray) -> None:
        self.ans.encode_reverse(x.astype(np.int32), self._stream.model.Categorical(perfect=False), probs)

    def pop_pixels(self, probs: np.ndarray) -> np.ndarray:
        return self.ans.decode(self._stream.model.Categorical(perfect=False), probs).astype(np.int64)

    @staticmethod
    def _size_probs(next_size, max_chunk: int) -> np.ndarray:
        """A chunk's size given the next chunk's (chunks grow slowly): a two-sided geometric
        around it; uniform for the last chunk."""
        sizes = np.arange(max_chunk + 1)
        return np.ones(max_chunk + 1) if next_size is None else 0.5 ** np.abs(sizes - next_size)

    def push_size(self, size: int, next_size, max_chunk: int) -> None:
        self.ans.encode_reverse(np.array([size], dtype=np.int32), self._stream.model.Categorical(perfect=False),
                                self._size_probs(next_size, max_chunk)[None])

    def pop_size(self, next_size, max_chunk: int) -> int:
        return int(self.ans.decode(self._stream.model.Categorical(perfect=False),
                                   self._size_probs(next_size, max_chunk)[None])[0])

    def push_uniform(self, values: np.ndarray, size: int) -> None:
        self.ans.encode_reverse(np.asarray(values, dtype=np.int32), self._stream.model.Uniform(size))

    def pop_uniform(self, count: int, size: int) -> np.ndarray:
        return self.ans.decode(self._stream.model.Uniform(size), count).astype(np.int64)

    def push_hints(self, hints: np.ndarray, size: int) -> None:
        if hints.size > _MAX_HINTS:
            raise CodecError(f"{hints.size} network outputs sit at rounding boundaries in one step "
                             f"(at most {_MAX_HINTS}): the model's outputs are not usable for coding")
        self.push_uniform(hints, size)
        self.ans.encode_reverse(np.array([hints.size], dtype=np.int32), self._hint_count)

    def pop_hints(self, size: int) -> np.ndarray:
        count = int(self.ans.decode(self._hint_count, 1)[0])
        return self.pop_uniform(count, size)


def _on_grid(eps: np.ndarray, where: str):
    """eps_hat in units of its 2^-_EPS_BITS grid: the grid point below, and the fraction above it."""
    if not np.isfinite(eps).all():
        raise CodecError(f"the network's noise prediction is not finite{where}")
    v = eps.reshape(-1) * 2.0**_EPS_BITS
    low = np.floor(v)
    return low, v - low


def round_eps(eps: np.ndarray):
    """Sender: eps_hat on its grid (in grid units) and the hints, ``2 * index + rounded_up``, for
    the values within the margin of a rounding boundary."""
    low, frac = _on_grid(eps, "")
    up = frac >= 0.5
    near = np.flatnonzero(np.abs(frac - 0.5) < _MARGIN * 2.0**_EPS_BITS)
    return (low + up).reshape(eps.shape), 2 * near + up[near]


def round_eps_hinted(eps: np.ndarray, hints: np.ndarray) -> np.ndarray:
    """Receiver: the sender's rounding of eps_hat, from this machine's eps_hat and the hints."""
    low, frac = _on_grid(eps, " on this machine")
    rounded = low + (frac >= 0.5)
    index, up = hints >> 1, hints & 1
    if index.size and (index >= low.size).any():
        raise CodecError("a rounding hint points outside its step")
    unflagged = np.ones(low.size, dtype=bool)
    unflagged[index] = False
    # An unflagged value this close to a boundary means the sender's value was not within the
    # margin there: this machine's arithmetic differs from the sender's by more than the margin.
    if (np.abs(frac[unflagged] - 0.5) < 0.5 * _MARGIN * 2.0**_EPS_BITS).any():
        raise CodecError("this machine's network outputs differ from the encoder's by more than the "
                         "coding margin: decode on a machine closer to the encoder's")
    # A flagged value sits within the margin of low + 1/2 on both machines, so `low` agrees.
    rounded[index] = low[index] + up
    return rounded.reshape(eps.shape)


def information(probs: np.ndarray, x: np.ndarray) -> float:
    """Bits that values ``x`` ([n]) cost under unnormalised distributions ``probs`` ([n, vocab])."""
    x = x.reshape(-1)
    return float(-np.log2(probs[np.arange(x.size), x] / probs.sum(axis=1)).sum())


def direct_block(chain: Chain, x: np.ndarray, bits: float):
    """Sender: the first images of ``x`` ([N, D]) whose direct coding yields ``bits`` (or all of
    them), with their distributions: (count, probs [count * D, vocab])."""
    counts, rows, total = np.full(chain.vocab, _COUNT_PRIOR), [], 0.0
    for image in x:
        probs, counts = chain.direct_probs(image, counts)
        rows.append(probs)
        total += information(probs, image)
        if total >= bits:
            break
    return len(rows), np.concatenate(rows)


def direct_bits(chain: Chain, x: np.ndarray) -> float:
    """Bits that the direct model spends on all of ``x`` ([N, D]) as one block."""
    _, probs = direct_block(chain, x, math.inf)
    return information(probs, x)


def encode_direct(coder: Coder, x: np.ndarray, probs: np.ndarray) -> None:
    """Sender: the direct block (from ``direct_block``) onto the stack, decoded first to last."""
    coder.push_pixels(x.reshape(-1), probs)


def decode_direct(coder: Coder, chain: Chain, n: int) -> np.ndarray:
    """Receiver: the direct block of ``n`` images, one pixel at a time (each distribution
    depends on the values before it)."""
    counts, out = np.full(chain.vocab, _COUNT_PRIOR), np.empty(n * chain.dims, dtype=np.int64)
    for j in range(out.size):
        out[j] = coder.pop_pixels((counts * chain.bump[j % chain.dims])[None])[0]
        counts[out[j]] += 1.0
    return out.reshape(n, chain.dims)


def encode_chunk(coder: Coder, chain: Chain, x: np.ndarray) -> None:
    """Sender: the chunk ``x`` ([n, D] integers) onto the stack, bits back in bit-swap order."""
    n, D = x.shape
    k = coder.take(chain.pop_scale[0] * chain.encode(x).reshape(-1), chain.pop_std[0])
    coder.push_pixels(x.reshape(-1), chain.x_probs(k))
    for i in range(1, chain.T + 1):
        k_next = coder.take(chain.pop_scale[i] * k, chain.pop_std[i])
        eps, hints = round_eps(chain.eps_hat(k_next, i))
        coder.push_latent(k, chain.push_mean(i, k_next, eps), chain.push_std[i - 1])
        coder.push_hints(hints, 2 * n * D)
        k = k_next
    coder.push_latent(k, np.zeros(k.size), chain.push_std[chain.T])


def decode_chunk(coder: Coder, chain: Chain, n: int) -> np.ndarray:
    """Receiver: a chunk of ``n`` images ([n, D] int64) off the stack, its bits given back."""
    D = chain.dims
    k = coder.pop_latent(np.zeros(n * D), chain.push_std[chain.T])
    for i in range(chain.T, 0, -1):
        eps = chain.eps_hat(k, i)
        hints = coder.pop_hints(2 * n * D)
        k_prev = coder.pop_latent(chain.push_mean(i, k, round_eps_hinted(eps, hints)), chain.push_std[i - 1])
        coder.give_back(k, chain.pop_scale[i] * k_prev, chain.pop_std[i])
        k = k_prev
    x = coder.pop_pixels(chain.x_probs(k))
    coder.give_back(k, chain.pop_scale[0] * chain.encode(x), chain.pop_std[0])
    return x.reshape(n, D)
