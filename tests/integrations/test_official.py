"""``vdm-fast convert``: the official VDM's checkpoints (google-research/vdm, JAX/Flax) as vdm_fast
models, equal to the official model in float64.

The fixtures in ``official/`` were made by the official code (``official/make_fixture.py``, which
needs JAX; these tests do not): three small models saved as the official trainer saves them, with
the official score network, schedule, loss terms and bpd on the draws the official code made.
"""

import copy
import json
import lzma
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

msgpack = pytest.importorskip("msgpack")
pytest.importorskip("safetensors")

from vdm_fast import cli  # noqa: E402
from vdm_fast.integrations import official  # noqa: E402
from vdm_fast.io import load_model  # noqa: E402

FIXTURES = Path(__file__).parent / "official"
NAMES = ("scalar", "attention", "nnet")
T_VALUES = (0, 10, 1000)
RTOL = 1e-10
# The official CIFAR-10 score network (configs/cifar10.py: n_embd 128, n_layer 32).
CIFAR10_PARAMETERS = 30_578_179


def fixture(name: str, folder: Path, filename: str = None):
    """``(checkpoint path, expected values)`` of a fixture, the checkpoint decompressed into ``folder``."""
    path = folder / (filename or f"{name}.flax")
    path.write_bytes(lzma.decompress((FIXTURES / f"{name}.flax.xz").read_bytes()))
    with np.load(FIXTURES / f"{name}.npz", allow_pickle=False) as npz:
        expected = {key: npz[key] for key in npz.files}
    return path, expected


def convert_args(ckpt: Path, out: Path, expected: dict, *extra) -> list:
    return [str(ckpt), "--out", str(out), "--data", "npy", "--image-size", str(expected["images"].shape[1]),
            "--gamma-min", repr(float(expected["gamma_min"])), "--gamma-max", repr(float(expected["gamma_max"])),
            *extra]


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def assert_close(got: torch.Tensor, want, what: str) -> None:
    want = torch.as_tensor(want, dtype=torch.float64)
    scale = want.abs().max().item()
    torch.testing.assert_close(got.detach(), want, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


def flax_bytes(state: dict) -> bytes:
    """``flax.serialization.to_bytes`` of a state dict of numpy arrays: msgpack, arrays as extension
    type 1 holding msgpack ``(shape, dtype name, C-order bytes)`` (flax/serialization.py)."""
    def pack(value):
        if isinstance(value, np.ndarray):
            header = (list(value.shape), value.dtype.name, value.tobytes("C"))
            return msgpack.ExtType(1, msgpack.packb(header, use_bin_type=True))
        raise TypeError(f"cannot pack {type(value).__name__}")
    return msgpack.packb(state, default=pack, strict_types=True)


def official_tree(n_embd: int, n_layer: int, every_block: bool, rng: np.random.Generator) -> dict:
    """A params tree of the official ``VDM`` (learned scalar schedule) with random float32
    values, named as flax names the official modules (model_vdm.py)."""
    cond = 4 * n_embd

    def a(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def dense(n_in, n_out, bias=True):
        return {"kernel": a(n_in, n_out), **({"bias": a(n_out)} if bias else {})}

    def conv(n_in, n_out):
        return {"kernel": a(3, 3, n_in, n_out), "bias": a(n_out)}

    def norm(n):
        return {"scale": a(n), "bias": a(n)}

    def resnet(n_in):
        block = {"GroupNorm_0": norm(n_in), "conv1": conv(n_in, n_embd), "cond_proj": dense(cond, n_embd, bias=False),
                 "GroupNorm_1": norm(n_embd), "conv2": conv(n_embd, n_embd)}
        if n_in != n_embd:
            block["nin_shortcut"] = dense(n_in, n_embd)
        return block

    def attention():
        return {"GroupNorm_0": norm(n_embd), **{name: dense(n_embd, n_embd) for name in ("q", "k", "v", "proj_out")}}

    net = {"dense0": dense(n_embd + 1, cond), "dense1": dense(cond, cond), "conv_in": conv(15, n_embd)}
    for i in range(n_layer):
        net[f"down.block_{i}"] = resnet(n_embd)
        if every_block:
            net[f"down.attn_{i}"] = attention()
    net.update({"mid.block_1": resnet(n_embd), "mid.attn_1": attention(), "mid.block_2": resnet(n_embd)})
    for i in range(n_layer + 1):
        net[f"up.block_{i}"] = resnet(2 * n_embd)
        if every_block:
            net[f"up.attn_{i}"] = attention()
    net.update({"GroupNorm_0": norm(n_embd), "conv_out": conv(n_embd, 3)})
    return {"gamma": {"w": np.array([18.3], np.float32), "b": np.array([-13.3], np.float32)}, "score_model": net}


def shapes(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(shapes(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = tuple(value.shape)
    return flat


@pytest.fixture(scope="module")
def scalar_state(tmp_path_factory):
    """The scalar fixture: its state as read (arrays still msgpack extension entries), and its bytes."""
    ckpt, _ = fixture("scalar", tmp_path_factory.mktemp("scalar"))
    return official.read_checkpoint(ckpt), ckpt.read_bytes()


# --------------------------------------------------------------------------- equal to the official model


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_is_the_official_model_in_float64(name, tmp_path, capsys):
    ckpt, expected = fixture(name, tmp_path)
    out = tmp_path / "converted"
    official.main(convert_args(ckpt, out, expected))
    printed = capsys.readouterr().out
    model, cfg, info = load_model(out)

    # The configuration found in the file, and what the command says of it.
    assert (cfg.n_embd, cfg.n_layer, cfg.attention, cfg.schedule) == (
        int(expected["n_embd"]), int(expected["n_layer"]), str(expected["attention"]), str(expected["schedule"]))
    assert (cfg.gamma_min, cfg.gamma_max) == (float(expected["gamma_min"]), float(expected["gamma_max"]))
    assert info["step"] == int(expected["step"]) and info["weights"] == "ema"
    count = sum(p.numel() for p in model.score_net.parameters())
    assert f"step {int(expected['step'])}" in printed and f"{count:,} parameters" in printed
    assert f"n_layer={cfg.n_layer} attention={cfg.attention} schedule={cfg.schedule}" in printed
    assert f"vdm-fast evaluate --ckpt {out}" in printed

    model = model.double()
    with torch.no_grad():
        # The score network, on random latents, times and conditioning scalars.
        eps_hat = model.score_net(nchw(expected["score_z"]), torch.from_numpy(expected["score_gamma"]),
                                  conditioning=torch.from_numpy(expected["score_conditioning"]))
        assert_close(eps_hat, nchw(expected["score_out"]), "score network")

        # The schedule and its time derivative.
        gamma, dgamma = model.gamma(torch.from_numpy(expected["gamma_t"]))
        assert_close(gamma, expected["gamma"], "gamma(t)")
        assert_close(dgamma, expected["dgamma"], "gamma'(t)")

        # The three loss terms and the bpd on the official draws, continuous time and T steps.
        x = nchw(expected["images"]).long()
        for T in T_VALUES:
            terms = model(x, T, t=torch.from_numpy(expected[f"T{T}_t"]), eps=nchw(expected[f"T{T}_eps"]),
                          eps_0=nchw(expected[f"T{T}_eps_0"]), conditioning=torch.from_numpy(expected["conditioning"]))
            assert_close(terms.reconstruction, expected[f"T{T}_recon"], f"T={T} reconstruction")
            assert_close(terms.prior, expected[f"T{T}_prior"], f"T={T} prior")
            assert_close(terms.diffusion, expected[f"T{T}_diffusion"], f"T={T} diffusion")
            assert_close(terms.bpd.mean(), expected[f"T{T}_bpd"], f"T={T} bpd")


def test_tree_params_converts_the_raw_weights(tmp_path):
    ckpt, expected = fixture("attention", tmp_path)
    out = tmp_path / "raw"
    official.main(convert_args(ckpt, out, expected, "--tree", "params"))
    model, _, info = load_model(out, use_ema=False)
    assert info["weights"] == "model"
    with torch.no_grad():
        eps_hat = model.double().score_net(nchw(expected["score_z"]), torch.from_numpy(expected["score_gamma"]),
                                           conditioning=torch.from_numpy(expected["score_conditioning"]))
    assert_close(eps_hat, nchw(expected["score_out_params"]), "score network of the params tree")
    # The two trees' outputs differ, so the comparison above tells which tree was read.
    assert (nchw(expected["score_out_params"]) - nchw(expected["score_out"])).abs().max() > 1e-3


def test_conditioning_is_an_input_of_the_network_and_the_loss(tmp_path):
    ckpt, expected = fixture("nnet", tmp_path)
    model, _, _, _ = official.convert(ckpt, data="npy", image_size=4)
    model = model.double()
    z, gamma = nchw(expected["score_z"]), torch.from_numpy(expected["score_gamma"])
    with torch.no_grad():
        plain = model.score_net(z, gamma)
        assert torch.equal(plain, model.score_net(z, gamma, conditioning=torch.zeros(2, dtype=torch.float64)))
        flagged = model.score_net(z, gamma, conditioning=torch.ones(2, dtype=torch.float64))
        assert (flagged - plain).abs().max() > 1e-3 * plain.abs().max()
        x = nchw(expected["images"]).long()
        draws = dict(t=torch.from_numpy(expected["T0_t"]), eps=nchw(expected["T0_eps"]), eps_0=nchw(expected["T0_eps_0"]))
        without = model(x, **draws).diffusion
        with_flag = model(x, **draws, conditioning=torch.from_numpy(expected["conditioning"])).diffusion
    # The fixture's batch is flagged [0, 1]: the first example's loss is unchanged, the second's not.
    assert without[0] == with_flag[0] and abs(without[1] - with_flag[1]) > 1e-6 * abs(with_flag[1])
    with pytest.raises(ValueError, match="conditioning must be a float tensor of shape"):
        model.score_net(z, gamma, conditioning=torch.zeros(3, dtype=torch.float64))


# --------------------------------------------------------------------------- the official CIFAR-10 tree


def test_the_official_cifar10_tree_maps_in_full(tmp_path):
    rng = np.random.default_rng(0)
    # The tree builder names and shapes parameters as the official code does: it gives exactly
    # the tree of the fixture made by the official code (width 64, one block, attention everywhere).
    ckpt, _ = fixture("attention", tmp_path)
    state = official.read_checkpoint(ckpt)
    made = official.flat_arrays(ckpt, state["ema_params"], "ema_params")
    built = shapes(official_tree(64, 1, True, rng))
    assert built == {name: array.shape for name, array in made.items()}

    tree = official_tree(128, 32, False, rng)
    path = tmp_path / "ckpt-1.flax"
    path.write_bytes(flax_bytes({"step": np.asarray(7, np.int32), "ema_params": tree, "opt_state": {}}))
    del tree
    model, cfg, step, _ = official.convert(path)
    assert (cfg.data, cfg.n_embd, cfg.n_layer, cfg.attention, cfg.schedule, step) == (
        "cifar10", 128, 32, "middle", "scalar", 7)
    assert model.image_shape == (3, 32, 32)
    assert sum(p.numel() for p in model.score_net.parameters()) == CIFAR10_PARAMETERS

    # Spot checks of the layouts, against the file's arrays.
    params = official.flat_arrays(path, official.read_checkpoint(path)["ema_params"], "ema_params")
    net = model.score_net

    def tensor(array):  # the file's arrays are read-only views of its bytes
        return torch.tensor(np.ascontiguousarray(array))

    attn = "score_model/mid.attn_1"
    assert torch.equal(net.mid_attn.qkv.weight, tensor(np.concatenate([params[f"{attn}/{n}/kernel"].T for n in "qkv"])))
    assert torch.equal(net.mid_attn.qkv.bias, tensor(np.concatenate([params[f"{attn}/{n}/bias"] for n in "qkv"])))
    assert torch.equal(net.up[32].nin_shortcut.weight, tensor(params["score_model/up.block_32/nin_shortcut/kernel"].T))
    assert torch.equal(net.conv_in.weight, tensor(params["score_model/conv_in/kernel"].transpose(3, 2, 0, 1)))
    assert torch.equal(net.down[31].norm2.weight, tensor(params["score_model/down.block_31/GroupNorm_1/scale"]))
    assert torch.equal(model.schedule.w, tensor(params["gamma/w"]))


def test_half_precision_parameters_are_read_exactly(scalar_state, tmp_path):
    rng = np.random.default_rng(1)
    bias16 = rng.standard_normal(256).astype(np.float16)
    bits = (rng.standard_normal(256).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # bfloat16
    state = copy.deepcopy(scalar_state[0])
    state["ema_params"]["score_model"]["dense1"]["bias"] = bias16
    state["ema_params"]["score_model"]["dense0"]["bias"] = msgpack.ExtType(
        1, msgpack.packb(([256], "bfloat16", bits.tobytes()), use_bin_type=True))
    path = tmp_path / "ckpt-1.flax"
    path.write_bytes(flax_bytes(state))
    model, _, _, _ = official.convert(path, data="npy", image_size=8)
    assert torch.equal(model.score_net.dense1.bias, torch.from_numpy(bias16.astype(np.float32)))
    assert torch.equal(model.score_net.dense0.bias, torch.from_numpy((bits.astype(np.uint32) << 16).view(np.float32)))


def test_a_tree_without_gamma_is_the_fixed_schedule(scalar_state, tmp_path):
    state = copy.deepcopy(scalar_state[0])
    del state["ema_params"]["gamma"]  # the official NoiseSchedule_FixedLinear has no parameters
    path = tmp_path / "ckpt-1.flax"
    path.write_bytes(flax_bytes(state))
    model, cfg, _, _ = official.convert(path, data="npy", image_size=8, gamma_min=-10.0, gamma_max=4.0)
    assert cfg.schedule == "fixed" and list(model.schedule.parameters()) == []
    t = torch.rand(5, dtype=torch.float64)
    gamma, dgamma = model.double().gamma(t)
    assert torch.allclose(gamma, -10.0 + 14.0 * t, rtol=1e-15, atol=1e-14) and torch.all(dgamma == 14.0)


def test_a_checkpoints_folder_gives_its_latest_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints-0"
    folder.mkdir()
    fixture("scalar", folder, "ckpt-2.flax")
    _, expected = fixture("attention", folder, "ckpt-10.flax")  # 10 > 2, though "ckpt-10" < "ckpt-2"
    assert official.find_checkpoint(folder) == folder / "ckpt-10.flax"
    model, _, step, path = official.convert(folder, data="npy", image_size=4,
                                            gamma_min=float(expected["gamma_min"]), gamma_max=float(expected["gamma_max"]))
    assert path == folder / "ckpt-10.flax" and step == int(expected["step"])
    with pytest.raises(official.OfficialCheckpointError, match=f"{tmp_path} holds no ckpt-N.flax"):
        official.find_checkpoint(tmp_path)


# --------------------------------------------------------------------------- refusals


def _set(*keys, value):
    def edit(state):
        node = state
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def _drop(*keys):
    def edit(state):
        node = state
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return edit


def _array_entry(shape, dtype_name, nbytes):
    return msgpack.ExtType(1, msgpack.packb((list(shape), dtype_name, bytes(nbytes)), use_bin_type=True))


NET = ("ema_params", "score_model")
EDITS = {
    "unknown parameter": (_set(*NET, "extra", value={"kernel": np.ones((2, 2), np.float32)}),
                          "has not: score_model/extra/kernel"),
    "missing parameter": (_drop(*NET, "mid.block_1", "conv1", "bias"),
                          "lacks parameters of the official model of its configuration: score_model/mid.block_1/conv1/bias"),
    "bad shape": (_set(*NET, "dense1", "kernel", value=np.ones((256, 255), np.float32)),
                  r"ema_params/score_model/dense1/kernel has shape \(256, 255\), the official model of the "
                  r"configuration its other parameters give needs \(256, 256\)"),
    "width of no configuration": (_set(*NET, "conv_in", "kernel", value=np.ones((3, 3, 15, 48), np.float32)),
                                  r"conv_in/kernel has shape \(3, 3, 15, 48\)"),
    "no Fourier features": (_set(*NET, "conv_in", "kernel", value=np.ones((3, 3, 3, 64), np.float32)),
                            r"conv_in/kernel has shape \(3, 3, 3, 64\)"),
    "bad dtype name": (_set(*NET, "dense1", "bias", value=_array_entry((256,), "object", 256 * 8)),
                       "ema_params/score_model/dense1/bias has dtype 'object', not one of"),
    "wrong byte count": (_set(*NET, "dense1", "bias", value=_array_entry((256,), "float32", 1000)),
                         r"ema_params/score_model/dense1/bias: a float32 array of shape \(256,\) needs 1024 bytes, "
                         "the file holds 1000"),
    "integer parameter": (_set(*NET, "dense1", "bias", value=np.ones(256, np.int32)),
                          "ema_params/score_model/dense1/bias is int32: parameters must be floating point"),
    "inexact float64 parameter": (_set(*NET, "dense1", "bias", value=np.full(256, 0.1)),
                                  "ema_params/score_model/dense1/bias is float64"),
    "not an array": (_set(*NET, "dense1", "bias", value=[1.0, 2.0]),
                     "ema_params/score_model/dense1/bias is a list, not an array"),
    "no EMA tree": (_drop("ema_params"), "holds no 'ema_params' tree"),
    "no step": (_drop("step"), "has no 'step' entry"),
}


def _refused(tmp_path, data: bytes, match: str):
    ckpt, out = tmp_path / "ckpt-5.flax", tmp_path / "out"
    ckpt.write_bytes(data)
    with pytest.raises(SystemExit) as info:
        official.main([str(ckpt), "--out", str(out), "--data", "npy", "--image-size", "8"])
    message = str(info.value)
    assert message.startswith(f"error: {ckpt}"), message  # the file, by name
    assert re.search(match, message), message
    assert not out.exists()  # nothing written
    return message


@pytest.mark.parametrize("case", sorted(EDITS))
def test_a_bad_parameter_tree_is_refused_by_name(case, scalar_state, tmp_path):
    state, _ = scalar_state
    edit, match = EDITS[case]
    edited = copy.deepcopy(state)
    edit(edited)
    _refused(tmp_path, flax_bytes(edited), match)


@pytest.mark.parametrize("case", ["not msgpack", "a zip file", "a pickle", "empty", "truncated", "one byte short",
                                  "a msgpack list"])
def test_a_foreign_or_truncated_file_is_refused_by_name(case, scalar_state, tmp_path):
    _, data = scalar_state
    content = {"not msgpack": b"hello, world\n", "a zip file": b"PK\x03\x04" + bytes(64),
               "a pickle": b"\x80\x04\x95" + bytes(64), "empty": b"", "truncated": data[:len(data) // 2],
               "one byte short": data[:-1], "a msgpack list": msgpack.packb([1, 2, 3])}[case]
    _refused(tmp_path, content, "is not a flax checkpoint")


def test_a_failed_conversion_leaves_an_existing_folder_untouched(scalar_state, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    ckpt = tmp_path / "ckpt-1.flax"
    ckpt.write_bytes(scalar_state[1][:-100])
    with pytest.raises(SystemExit, match="is not a flax checkpoint"):
        official.main([str(ckpt), "--out", str(out), "--data", "npy", "--image-size", "8", "--force"])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_the_flags_are_checked(scalar_state, tmp_path):
    ckpt = tmp_path / "ckpt-1.flax"
    ckpt.write_bytes(scalar_state[1])
    for flags, match in ((["--data", "npy"], "give image_size"), (["--image-size", "64"], "cifar10 images are 32x32"),
                         (["--data", "npy", "--image-size", "8", "--gamma-min", "6"], "gamma_min must be < gamma_max")):
        with pytest.raises(SystemExit, match=match):
            official.main([str(ckpt), "--out", str(tmp_path / "out"), *flags])
        assert not (tmp_path / "out").exists()
    # An existing non-empty folder needs --force, and is then overwritten.
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        official.main([str(ckpt), "--out", str(out), "--data", "npy", "--image-size", "8"])
    official.main([str(ckpt), "--out", str(out), "--data", "npy", "--image-size", "8", "--force"])
    assert load_model(out)[2]["step"] == 20_000


# --------------------------------------------------------------------------- the command line


def test_convert_is_a_vdm_fast_command_and_evaluate_reads_its_folder(tmp_path, capsys):
    assert cli.COMMANDS["convert"][0] == "vdm_fast.integrations.official"
    ckpt, expected = fixture("nnet", tmp_path)
    out = tmp_path / "converted"
    assert cli.main(["convert", *convert_args(ckpt, out, expected)]) == 0
    rng = np.random.default_rng(0)
    data = tmp_path / "images.npz"
    np.savez(data, train=rng.integers(0, 256, (4, 4, 4, 3), dtype=np.uint8),
             test=rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8))
    result = tmp_path / "result.json"
    assert cli.main(["evaluate", "--ckpt", str(out), "--data-dir", str(data), "--draws", "1", "--batch-size", "3",
                     "--json", str(result)]) == 0
    record = json.loads(result.read_text())
    assert record["images"] == 3 and math.isfinite(record["bpd"]) and record["step"] == int(expected["step"])
    capsys.readouterr()
