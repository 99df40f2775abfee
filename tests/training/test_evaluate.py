"""python -m vdm_fast.training.evaluate: standard errors and draws, the bound summed over every step, draws
seeded by each image's index (so batches and processes do not change them), 2 gloo processes
under torchrun equal to one, the ODE likelihood from the command line, and a class-conditional
checkpoint evaluated with its labels."""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ONE_THREAD, run_cli

from vdm_fast.training import data, evaluate
from vdm_fast.io import load_model
from vdm_fast.diffusion import draws, pixels
from vdm_fast.reference import loss as ref


def torchrun(nproc, module, args, timeout=300):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port", str(port),
           "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ONE_THREAD},
                          cwd="/")


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    model, _, _ = load_model(tiny_ckpt)
    return model.eval()


def _json(tmp_path, name, proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / name).read_text())


# --- statistics, draws, the bound ----------------------------------------------------------------

def test_summarize_is_the_mean_of_image_means_with_its_standard_errors():
    values = torch.tensor([[1.0, 3.0], [2.0, 2.0], [4.0, 8.0]])
    s = evaluate.summarize(values)
    means = np.array([2.0, 2.0, 6.0])
    assert s["bpd"] == pytest.approx(means.mean()) and (s["images"], s["draws"]) == (3, 2)
    assert s["se"] == pytest.approx(means.std(ddof=1) / math.sqrt(3))
    within = np.array([2.0, 0.0, 8.0])  # each image's variance over its draws (ddof 1)
    assert s["mc_se"] == pytest.approx(math.sqrt(within.mean() / (2 * 3)))
    one = evaluate.summarize(torch.tensor([[1.0], [2.0]]))
    assert one["mc_se"] is None and one["se"] == pytest.approx(0.5)
    assert math.isnan(evaluate.summarize(torch.tensor([[1.0]]))["se"])


def test_an_images_draws_are_stratified_in_time(tiny_model, digits, monkeypatch):
    """Draw k of K takes t = (u + k / K) mod 1, one uniform u an image (from its own stream): K
    draws of an image cover [0, 1) evenly; the noises are each draw's own."""
    seen = []
    forward = type(tiny_model).forward

    def spy(self, x, *args, t=None, eps=None, **kwargs):
        seen.append((t.clone(), eps.clone()))
        return forward(self, x, *args, t=t, eps=eps, **kwargs)

    monkeypatch.setattr(type(tiny_model), "forward", spy)
    K = 4
    with torch.no_grad():
        for k in range(K):
            evaluate.bound_draw(tiny_model, digits[:5], None, range(7, 12), k, K, seed=3)
    times = torch.stack([t for t, _ in seen]).double()  # [K, 5]
    u = torch.cat([torch.rand(1, generator=draws.image_generator(3, i, 0, 2), dtype=torch.float32)
                   for i in range(7, 12)]).double()
    expected = torch.remainder(u + torch.arange(K).double()[:, None] / K, 1.0)
    assert torch.allclose(times, expected, atol=1e-6)
    assert not torch.allclose(seen[0][1], seen[1][1])  # each draw its own noise


def test_the_trainers_test_bpd_is_the_evaluate_commands_default(tiny_ckpt, tmp_path):
    """The final report of a run and ``evaluate`` with its defaults on the run's checkpoint print
    the same figure and standard error (one way to compute a test bpd)."""
    result = json.loads((tiny_ckpt.parent / "result.json").read_text())
    proc = run_cli("vdm_fast.training.evaluate", ["--ckpt", str(tiny_ckpt), "--batches", "1", "--json",
                                         str(tmp_path / "r.json")], env=ONE_THREAD)
    r = _json(tmp_path, "r.json", proc)
    assert r["draws"] == evaluate.BOUND_DRAWS and r["images"] == 16
    assert result["test_bpd"] == pytest.approx(r["bpd"], rel=1e-9)
    assert result["test_bpd_se"] == pytest.approx(r["se"], rel=1e-9)


@pytest.mark.parametrize("T, every_step", [(0, False), (7, False), (4, True)])
def test_each_image_gets_its_own_draws_whatever_the_batch(tiny_model, digits, T, every_step):
    kwargs = dict(max_batches=0, draws=2, T=T, every_step=every_step, seed=5)
    a = evaluate.evaluate(tiny_model, digits[:20], batch_size=20, **kwargs)
    b = evaluate.evaluate(tiny_model, digits[:20], batch_size=6, **kwargs)
    assert np.allclose(a["per_image"], b["per_image"], rtol=0, atol=1e-5)
    c = evaluate.evaluate(tiny_model, digits[:20], batch_size=20, **{**kwargs, "seed": 6})
    assert not np.allclose(a["per_image"], c["per_image"])  # the seed matters


def test_every_step_sums_the_t_step_bound_over_all_steps(tiny_model, digits):
    """Against the T-step bound written out from the reference: reconstruction + prior + the sum
    over i of 0.5 expm1(gamma_i - gamma_{i-1}) ||eps_i - eps_hat(z_i)||^2, with the draws in the
    documented order (eps_0, then one eps per step) from each image's generator."""
    T, x = 3, digits[:4]
    got = evaluate.bound_draw(tiny_model, x, None, range(10, 14), 1, 2, T=T, every_step=True, seed=2)
    gens = [draws.image_generator(2, i, 1, 0) for i in range(10, 14)]
    eps_0 = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
    f = pixels.encode(x, 17)
    with torch.no_grad():
        grid, _ = tiny_model.gamma(torch.arange(T + 1, dtype=torch.float32) / T)
        grid = grid.detach()
        nats = ref.reconstruction_loss(x, eps_0, grid[0].expand(4), 17) + ref.prior_loss(f, grid[T].expand(4))
        for i in range(1, T + 1):
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
            g_t = grid[i].expand(4)
            z = ref.diffuse(f, eps, g_t)
            eps_hat = tiny_model.predict_eps(z, g_t, None, 0.0)
            nats = nats + 0.5 * torch.expm1(grid[i] - grid[i - 1]) * ((eps - eps_hat) ** 2).reshape(4, -1).sum(1)
    assert torch.allclose(got, pixels.bits_per_dim(nats, 64).double(), rtol=1e-5)


def test_the_bound_from_the_command_line_carries_its_standard_error(tiny_ckpt, tmp_path):
    proc = run_cli("vdm_fast.training.evaluate", ["--ckpt", str(tiny_ckpt), "--batches", "2", "--draws", "3",
                                         "--json", str(tmp_path / "r.json")], env=ONE_THREAD)
    r = _json(tmp_path, "r.json", proc)
    assert (r["images"], r["draws"], r["likelihood"]) == (32, 3, "bound") and len(r["per_image"]) == 32
    assert 0 < r["mc_se"] and 0 < r["se"] and np.isfinite(r["bpd"])
    assert f"{r['bpd']:.4f} +- {r['se']:.4f}" in proc.stdout and "32 images" in proc.stdout
    assert "3 draws" in proc.stdout and "Monte-Carlo share" in proc.stdout
    assert "histogram baseline" in proc.stdout
    every = run_cli("vdm_fast.training.evaluate", ["--ckpt", str(tiny_ckpt), "--batches", "1", "--T", "4", "--every-step"],
                    env=ONE_THREAD)
    assert every.returncode == 0 and "summed over every step" in every.stdout and "+-" in every.stdout, every.stderr


@pytest.mark.parametrize("args, message", [
    (["--every-step"], "give --T"),
    (["--likelihood", "ode", "--T", "10"], "continuous-time"),
    (["--draws", "0"], "--draws must be >= 1"),
    (["--likelihood", "ode", "--method", "euler"], "adaptive"),
])
def test_contradictory_flags_are_refused(tiny_ckpt, args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--ckpt", str(tiny_ckpt), *args])
    assert stop.value.code != 0 and message in capsys.readouterr().err


# --- the ODE likelihood ------------------------------------------------------------------------

def test_the_ode_likelihood_from_the_command_line(tiny_ckpt, tmp_path):
    pytest.importorskip("torchdiffeq")
    common = ["--ckpt", str(tiny_ckpt), "--likelihood", "ode", "--batches", "1", "--batch-size", "3",
              "--rtol", "1e-3", "--atol", "1e-3"]
    proc = run_cli("vdm_fast.training.evaluate", [*common, "--json", str(tmp_path / "ode.json")], env=ONE_THREAD)
    r = _json(tmp_path, "ode.json", proc)
    assert r["trace"] == "exact" and r["images"] == 3 and r["nfe"]["solves"] == 1 and r["nfe"]["min"] > 5
    assert "probability-flow ODE" in proc.stdout and "NFE" in proc.stdout and "+-" in proc.stdout
    hutch = run_cli("vdm_fast.training.evaluate", [*common, "--trace", "hutchinson", "--probes", "2",
                                          "--json", str(tmp_path / "h.json")], env=ONE_THREAD)
    h = _json(tmp_path, "h.json", hutch)
    # the estimator is unbiased: close to the exact trace's figure on the same z_0 draws
    assert abs(h["bpd"] - r["bpd"]) < 0.2 and h["trace"] == "hutchinson" and h["probes"] == 2
    assert "2 rademacher probes" in hutch.stdout


# --- torchrun: 2 gloo processes compute what one does ------------------------------------------

@pytest.mark.parametrize("likelihood", ["bound", "ode"])
def test_two_gloo_processes_equal_one(tiny_ckpt, tmp_path, likelihood):
    if likelihood == "ode":
        pytest.importorskip("torchdiffeq")
    # 3 batches, dealt out 0, 2 | 1; for the ODE, Hutchinson's probes are seeded draws too
    size = 6 if likelihood == "bound" else 2
    args = ["--ckpt", str(tiny_ckpt), "--device", "cpu", "--batch-size", str(size), "--batches", "3",
            "--likelihood", likelihood, "--draws", "2"]
    if likelihood == "ode":
        args += ["--rtol", "1e-3", "--atol", "1e-3", "--trace", "hutchinson", "--probes", "2"]
    one = _json(tmp_path, "one.json", run_cli("vdm_fast.training.evaluate", [*args, "--json", str(tmp_path / "one.json")],
                                                  env=ONE_THREAD))
    two_proc = torchrun(2, "vdm_fast.training.evaluate", [*args, "--json", str(tmp_path / "two.json")])
    two = _json(tmp_path, "two.json", two_proc)
    assert "2 processes" in two_proc.stdout and two["processes"] == 2 and one["processes"] == 1
    assert (two["images"], two["draws"]) == (one["images"], one["draws"]) == (3 * size, 2)
    # the same draws for each image, the same batches solved alike
    assert np.allclose(two["per_image"], one["per_image"], rtol=0, atol=1e-5)
    assert two["bpd"] == pytest.approx(one["bpd"], abs=1e-5) and two["se"] == pytest.approx(one["se"], abs=1e-5)
    if likelihood == "ode":
        assert two["nfe"]["total"] == one["nfe"]["total"]


# --- a class-conditional checkpoint -----------------------------------------------------------

def test_a_conditional_checkpoint_evaluates_with_its_labels(conditional_ckpt, tmp_path):
    proc = run_cli("vdm_fast.training.evaluate", ["--ckpt", str(conditional_ckpt), "--batches", "1", "--json",
                                         str(tmp_path / "c.json")], env=ONE_THREAD)
    r = _json(tmp_path, "c.json", proc)
    assert r["images"] == 16 and np.isfinite(r["bpd"])
    # The command's figure is the bound given each image's own label, which other labels change: by
    # up to 0.018 to 0.066 bpd an image for the next class, 0.022 to 0.031 for the null class
    # (2026-12-07, AMD EPYC, this fixture's run at seeds 0 to 4); the same labels twice, by 0.
    model, _, _ = load_model(conditional_ckpt)
    test = data.load_digits().test
    images, labels = test.images[:16], test.labels[:16]

    def bound(y):
        return np.array(evaluate.evaluate(model, images, y, batch_size=16, draws=r["draws"])["per_image"])

    own = bound(labels)
    assert np.allclose(own, r["per_image"], rtol=0, atol=1e-5)
    for other in ((labels + 1) % 10, torch.full_like(labels, model.num_classes)):
        assert np.abs(bound(other) - own).max() > 1e-3
