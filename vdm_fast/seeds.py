"""Seeds derived from integers, so that every random draw of a run is a function of its
coordinates (seed, step, stream, ...) rather than of a running generator's history."""


def mix(*values: int) -> int:
    """A 63-bit seed from integers (deterministic across runs, unlike Python's hash of a tuple)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & (2**63 - 1)
    return h
