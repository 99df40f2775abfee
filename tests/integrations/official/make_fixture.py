"""Fixtures of the official VDM code (google-research/vdm, ``model_vdm.py`` and ``train_state.py``)
for ``tests/integrations/test_official.py``: small models of the official architecture, each
saved as the official trainer saves its checkpoints, with what the official code computes from
them in float64.

Regenerate (JAX, flax and optax on the CPU, in an environment of their own; vdm_fast needs none
of them)::

    python -m venv /tmp/venv-jax
    /tmp/venv-jax/bin/pip install jax flax optax chex numpy msgpack
    git clone https://github.com/google-research/vdm /tmp/vdm
    /tmp/venv-jax/bin/python tests/integrations/official/make_fixture.py /tmp/vdm

(the argument: the official repository's folder, or its ``model_vdm.py``; ``train_state.py`` is
read from the same folder). The committed files were made with google-research/vdm at dc27b98,
jax 0.10.2, flax 0.12.8, optax 0.2.8, numpy 2, on an x86-64 CPU; the random draws below are
numpy's and JAX's (threefry) and so do not depend on the machine.

For each configuration of ``CONFIGS`` the script writes into this folder:

``NAME.flax.xz``
    ``flax.serialization.to_bytes`` of the official ``TrainState`` (``step``, ``params``,
    ``ema_params``, ``opt_state`` of the official AdamW), as ``clu``'s checkpointer writes
    ``checkpoints-0/ckpt-N.flax``, xz-compressed for the repository (the test decompresses it).
    Weights are float32, as the official trainer keeps them, drawn at random (each array from
    4 levels around its mean, so that the files compress) and away from the official zero
    initialisation of the layers that end a residual branch (which would make the score network
    the identity); ``ema_params`` are ``params`` with a run of entries of every array moved, so
    that which tree was converted shows in every output. The optimiser's moments are its
    initial zeros. The width is 64: at 32 each GroupNorm group holds one channel, and the norms
    would remove the time conditioning entirely (dense0, dense1 and cond_proj untested).
``NAME.npz``
    ``np.savez`` arrays, no objects: the inputs and the official outputs (float64), all
    computed from ``ema_params`` (what the official evaluation uses) unless named ``_params``:

    - ``n_embd``, ``n_layer``, ``attention`` ("middle" or "all"), ``schedule`` ("scalar" or
      "nnet"), ``gamma_min``, ``gamma_max``, ``step``: the configuration, for the test to check
      what the converter infers, and the endpoints it must be told (they are not in the file);
    - ``score_z`` [B, H, W, 3] (NHWC, the official layout), ``score_gamma`` [B],
      ``score_conditioning`` [B]: inputs of the official ``ScoreUNet``; ``score_out`` and
      ``score_out_params``: its output from each tree;
    - ``gamma_t`` [K], ``gamma`` and ``dgamma``: the schedule ``gamma(t)`` and ``gamma'(t)``
      (``jax.jvp``, as the official continuous-time loss takes it);
    - ``images`` [B, H, W, 3] uint8 and ``conditioning`` [B]: a batch of the official
      ``VDM.__call__``; then for each ``T`` in ``T_VALUES`` (``T0`` continuous time),
      ``T{T}_eps_0``, ``T{T}_t`` (the antithetic times before the T-step grid) and ``T{T}_eps``:
      the draws the official code made (recorded as it drew them), ``T{T}_recon``,
      ``T{T}_prior`` and ``T{T}_diffusion`` ([B], nats): its three loss terms, and ``T{T}_bpd``:
      their batch means in bits per dim, summed, as ``experiment_vdm.loss_fn`` reports.

The official code computes the sinusoidal time embedding and the attention weights in float32
(a ``dtype=jnp.float32`` default of ``get_timestep_embedding`` and ``dot_product_attention``);
the script sets those defaults to float64, so every output here is the official function in
float64 throughout (x64 enabled).
"""

import argparse
import importlib.util
import inspect
import lzma
import sys
from pathlib import Path

import numpy as np

import jax

jax.config.update("jax_enable_x64", True)

import flax  # noqa: E402 (after x64 is enabled)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

HERE = Path(__file__).resolve().parent
LEVELS = 4  # weights per array: random signs and two magnitudes (few bit patterns: the files compress)
N_EMBD = 64  # at 32 (one channel per GroupNorm group) the norms would remove the time conditioning
BATCH = 2  # the official antithetic times take jnp.arange(0, 1, 1 / B), whose length is B for B = 2
T_VALUES = (0, 10, 1000)
CONFIGS = {
    # the official CIFAR-10 configuration's kind: learned scalar schedule, attention in the middle
    # (n_layer 0: one up block, no down block; the attention configuration has both)
    "scalar": dict(gamma_type="learnable_scalar", with_attention=False, n_layer=0, image_size=8,
                   gamma_min=-13.3, gamma_max=5.0, step=20_000),
    # with_attention: an attention block after every down and up block; other endpoints; two up
    # blocks taking the skip connections in turn
    "attention": dict(gamma_type="learnable_scalar", with_attention=True, n_layer=1, image_size=4,
                      gamma_min=-12.0, gamma_max=6.0, step=30_000),
    # the augmented CIFAR-10 configuration's schedule: the monotone network (1024 features)
    "nnet": dict(gamma_type="learnable_nnet", with_attention=False, n_layer=0, image_size=4,
                 gamma_min=-13.3, gamma_max=5.0, step=40_000),
}


def load_official(source: Path):
    """The official ``model_vdm`` and ``train_state`` modules from the repository folder (or the
    folder of the ``model_vdm.py`` given)."""
    folder = source.parent if source.is_file() else source
    modules = []
    for name in ("model_vdm", "train_state"):
        path = folder / f"{name}.py"
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: pass the google-research/vdm folder or its model_vdm.py")
        spec = importlib.util.spec_from_file_location(f"official_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    model_vdm, train_state = modules
    for fn in (model_vdm.get_timestep_embedding, model_vdm.dot_product_attention):
        compute_in_float64(fn)
    return model_vdm, train_state


def compute_in_float64(fn) -> None:
    """Set the ``dtype`` default of an official function (float32) to float64."""
    names = list(inspect.signature(fn).parameters)
    defaults = list(fn.__defaults__)
    defaults[names.index("dtype") - (len(names) - len(defaults))] = jnp.float64
    fn.__defaults__ = tuple(defaults)


def official_config(model_vdm, spec: dict, T: int):
    return model_vdm.VDMConfig(
        vocab_size=256, sample_softmax=False, antithetic_time_sampling=True, with_fourier_features=True,
        with_attention=spec["with_attention"], gamma_type=spec["gamma_type"], gamma_min=spec["gamma_min"],
        gamma_max=spec["gamma_max"], sm_n_timesteps=T, sm_n_embd=N_EMBD, sm_n_layer=spec["n_layer"], sm_pdrop=0.1)


def levels(rng: np.random.Generator, shape, std: float, mean: float = 0.0) -> np.ndarray:
    """float32 draws of mean ``mean`` and deviation ``std`` from ``LEVELS`` equally spaced levels
    (uniform): random enough to tell every weight's place, and few bit patterns."""
    k = rng.integers(-LEVELS // 2, LEVELS // 2, size=shape) + 0.5  # deviation LEVELS / sqrt(12)
    return (mean + std * k * (np.sqrt(12.0) / LEVELS)).astype(np.float32)


def random_weights(template: dict, spec: dict, rng: np.random.Generator) -> dict:
    """float32 weights of the template's tree: kernels of deviation 1/sqrt(fan_in), GroupNorm
    scales near 1, biases of deviation 0.2; the schedule moved off its initial line (a negative
    scalar slope: the official schedule takes its absolute value)."""
    span = spec["gamma_max"] - spec["gamma_min"]
    weights = {}
    for path, leaf in flatten_dict(template).items():
        shape, name = leaf.shape, path[-1]
        if path[0] == "gamma":
            layer = path[1] if len(path) > 2 else None
            if name == "w":
                value = np.full(shape, -0.9 * span, np.float32)
            elif name == "b":
                value = np.full(shape, spec["gamma_min"] + 0.7, np.float32)
            elif layer == "l1":
                value = np.full(shape, 0.95 * span if name == "kernel" else spec["gamma_min"] + 0.5, np.float32)
            else:  # l2 kernel and bias, l3 kernel: both signs (the layers take |kernel|)
                value = levels(rng, shape, 1.5 if name == "kernel" else 1.0)
        elif name == "kernel":
            value = levels(rng, shape, 1.0 / np.sqrt(np.prod(shape[:-1])))
        elif name == "scale":
            value = levels(rng, shape, 0.2, mean=1.0)
        else:
            value = levels(rng, shape, 0.2)
        weights[path] = value
    return unflatten_dict(weights)


def perturbed(weights: dict, rng: np.random.Generator) -> dict:
    """The EMA tree: in every array, a run of entries (a fiftieth, at least one) moved by 2% of
    the array's scale (of its value, for a scalar). One run per array, so the file compresses."""
    def move(w):
        flat = w.reshape(-1).astype(np.float64)
        n = max(1, flat.size // 50)
        start = rng.integers(flat.size - n + 1)
        scale = np.abs(flat).mean()
        flat[start:start + n] += rng.choice([-1.0, 1.0], n) * 0.02 * scale
        return flat.reshape(w.shape).astype(np.float32)
    return jax.tree_util.tree_map(move, weights)


def as_float64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def recording(fn, record: list):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        record.append(np.asarray(out))
        return out
    return wrapper


def official_losses(model_vdm, spec, params, images, conditioning, T, key) -> dict:
    """The three loss terms of the official ``VDM.__call__`` on ``images``, with the draws it made."""
    model = model_vdm.VDM(official_config(model_vdm, spec, T))
    normals, uniforms = [], []
    normal, uniform = jax.random.normal, jax.random.uniform
    jax.random.normal, jax.random.uniform = recording(normal, normals), recording(uniform, uniforms)
    try:
        out = model.apply({"params": params}, images, conditioning, deterministic=True, rngs={"sample": key})
    finally:
        jax.random.normal, jax.random.uniform = normal, uniform
    # The official order of draws: eps_0, then the antithetic times' one uniform, then eps.
    assert len(normals) == 2 and len(uniforms) == 1, (len(normals), len(uniforms))
    (t0,) = uniforms
    t = jnp.mod(t0 + jnp.arange(0.0, 1.0, step=1.0 / BATCH), 1.0)  # the official antithetic times
    rescale = 1.0 / (np.prod(images.shape[1:]) * np.log(2.0))  # experiment_vdm.loss_fn
    bpd = (np.mean(out.loss_recon) + np.mean(out.loss_klz) + np.mean(out.loss_diff)) * rescale
    return {f"T{T}_eps_0": normals[0], f"T{T}_t": np.asarray(t), f"T{T}_eps": normals[1],
            f"T{T}_recon": np.asarray(out.loss_recon), f"T{T}_prior": np.asarray(out.loss_klz),
            f"T{T}_diffusion": np.asarray(out.loss_diff), f"T{T}_bpd": np.asarray(bpd)}


def make(model_vdm, train_state, name: str, spec: dict, seed: int) -> None:
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    size = spec["image_size"]
    model = model_vdm.VDM(official_config(model_vdm, spec, 0))
    variables = model.init({"params": key, "sample": key}, images=jnp.zeros((BATCH, size, size, 3), "uint8"),
                           conditioning=jnp.zeros((BATCH,)))
    params = random_weights(variables["params"], spec, rng)
    ema_params = perturbed(params, rng)

    # The official TrainState with the official optimiser (AdamW, no weight decay on biases),
    # at a later step with these weights.
    def adamw(lr):
        mask = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "bias", p)  # noqa: E731
        return optax.adamw(learning_rate=lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, mask=mask)

    state = train_state.TrainState.create(apply_fn=model.apply, variables={"params": params}, optax_optimizer=adamw)
    state = state.replace(step=np.asarray(spec["step"], np.int32), params=params, ema_params=ema_params)
    blob = flax.serialization.to_bytes(state)
    (HERE / f"{name}.flax.xz").write_bytes(lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME))

    ema64, params64 = as_float64(ema_params), as_float64(params)
    out = {"n_embd": np.asarray(N_EMBD), "n_layer": np.asarray(spec["n_layer"]),
           "attention": np.asarray("all" if spec["with_attention"] else "middle"),
           "schedule": np.asarray("scalar" if spec["gamma_type"] == "learnable_scalar" else "nnet"),
           "gamma_min": np.asarray(spec["gamma_min"]), "gamma_max": np.asarray(spec["gamma_max"]),
           "step": np.asarray(spec["step"])}

    # The score network on random latents, times and conditioning scalars.
    cfg = official_config(model_vdm, spec, 0)
    unet = model_vdm.ScoreUNet(cfg)
    z = rng.normal(size=(BATCH, size, size, 3))
    g = rng.uniform(spec["gamma_min"], spec["gamma_max"], BATCH)
    c = rng.normal(size=BATCH)
    out.update(score_z=z, score_gamma=g, score_conditioning=c)
    for suffix, tree in (("", ema64), ("_params", params64)):
        out[f"score_out{suffix}"] = np.asarray(unet.apply({"params": tree["score_model"]}, z, g, c, deterministic=True))

    # The schedule and its time derivative.
    schedule = model_vdm.VDM(cfg)
    gamma_fn = lambda t: schedule.apply({"params": ema64}, t, method=lambda m, t: m.gamma(t))  # noqa: E731
    t = np.concatenate([[0.0, 1.0], rng.uniform(size=5)])
    gamma, dgamma = jax.jvp(gamma_fn, (jnp.asarray(t),), (jnp.ones_like(t),))
    out.update(gamma_t=t, gamma=np.asarray(gamma), dgamma=np.asarray(dgamma))

    # The loss terms on a batch, with the official draws. The conditioning scalar of the
    # augmented model's kind (an augmentation flag) for the monotone-network configuration.
    images = rng.integers(0, 256, size=(BATCH, size, size, 3), dtype=np.uint8)
    conditioning = np.array([0.0, 1.0]) if spec["gamma_type"] == "learnable_nnet" else np.zeros(BATCH)
    out.update(images=images, conditioning=conditioning)
    for T in T_VALUES:
        out.update(official_losses(model_vdm, spec, ema64, jnp.asarray(images), jnp.asarray(conditioning), T,
                                   jax.random.PRNGKey(seed + 1)))
    np.savez(HERE / f"{name}.npz", **out)
    n = sum(a.size for a in jax.tree_util.tree_leaves(params["score_model"]))
    print(f"{name}: {n} score-network parameters, {len(blob)} bytes of checkpoint "
          f"({(HERE / f'{name}.flax.xz').stat().st_size} compressed)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official", type=Path, help="the google-research/vdm folder, or its model_vdm.py")
    args = parser.parse_args(argv)
    model_vdm, train_state = load_official(args.official)
    for seed, (name, spec) in enumerate(CONFIGS.items()):
        make(model_vdm, train_state, name, spec, seed)


if __name__ == "__main__":
    sys.exit(main())
