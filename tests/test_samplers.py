"""The samplers (``vdm_fast.samplers``: ancestral, DDIM, DPM-Solver++(2M)), the inverted schedule
``t(lambda)`` and the sampling CLI's flags.

The exact checks use a model whose noise prediction is the Bayes denoiser of Gaussian data
``x ~ N(mu, s^2)`` per element (``helpers.gaussian_vdm``): ``E[eps | z_t] = sigma_t (z_t - alpha_t
mu) / (alpha_t^2 s^2 + sigma_t^2)``. Its probability-flow ODE keeps ``(z_t - alpha_t mu) /
sqrt(alpha_t^2 s^2 + sigma_t^2)`` constant, so ``z_1`` maps to a known ``z_0``, which the
deterministic samplers must approach at their order (DDIM 1, DPM-Solver++(2M) 2). Classifier-free
guidance of two such classes is again a Gaussian denoiser, of mean ``(1 + w) mu_c - w mu_null``.
"""

import numpy as np
import pytest
import torch
from helpers import SAMPLERS, assert_close, curved_schedule, gaussian_vdm, small_vdm

from vdm_fast import nn as vnn
from vdm_fast import samplers
from vdm_fast.diffusion.pixels import decode
from vdm_fast.diffusion.process import alpha_sigma, per_example
from vdm_fast.diffusion.sampling import ancestral_step


def flow_solution(model, z_1, mean, s=0.3):
    """The exact probability-flow ODE map z_1 -> z_0 for Gaussian data of ``mean`` (per example
    ``[n]`` or one number)."""
    gamma_1, gamma_0 = model.gamma(torch.tensor([1.0, 0.0], dtype=torch.float64))[0]
    a1, s1 = alpha_sigma(gamma_1)
    a0, s0 = alpha_sigma(gamma_0)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    mean = per_example(mean, z_1) if mean.dim() else mean
    return a0 * mean + torch.sqrt(a0**2 * s**2 + s0**2) * (z_1 - a1 * mean) / torch.sqrt(a1**2 * s**2 + s1**2)


def error(model, z_1, exact, steps, sampler, **kwargs):
    return (samplers.denoise(model, z_1, steps, sampler, **kwargs) - exact).abs().max().item()


# --- every sampler: images, determinism ---------------------------------------------------------

@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_each_sampler_returns_integer_images_deterministic_for_a_seed(sampler, eta):
    model = small_vdm(channels=2, size=5, perturb=0.02)
    run = lambda seed: model.sample(3, 4, generator=torch.Generator().manual_seed(seed), sampler=sampler,  # noqa: E731
                                    eta=eta)
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 2, 5, 5) and a.dtype == torch.int64
    assert a.min() >= 0 and a.max() < 17
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = samplers.sample(model, 3, 4, sampler, eta=eta, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, a)


def _todays_vdm_sample(model, n, T, generator, sample_x=False, labels=None, guidance=0.0):
    """VDM.sample as it was before the samplers (frozen here to hold the ancestral path to it)."""
    with torch.no_grad():
        device = next(model.parameters()).device
        z = torch.randn((n, *model.image_shape), generator=generator, device=device, dtype=model.dtype)
        grid = torch.arange(T, -1, -1, device=device, dtype=model.dtype) / T
        gammas = model.gamma(grid)[0].detach()
        for i in range(T):
            gamma_t, gamma_s = gammas[i].expand(n), gammas[i + 1].expand(n)
            eps_hat = model.predict_eps(z, gamma_t, labels, guidance)
            noise = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)
            z = ancestral_step(z, eps_hat, gamma_t, gamma_s, noise)
        gamma_0 = gammas[T].expand(n)
        alpha_0, _ = alpha_sigma(gamma_0)
        return decode(z / alpha_0[:, None, None, None], gamma_0, model.vocab_size, sample_x, generator)


@pytest.mark.parametrize("schedule", ["fixed", "scalar", "nnet"])
@pytest.mark.parametrize("sample_x", [False, True])
def test_the_ancestral_sampler_gives_todays_images_bit_for_bit(schedule, sample_x):
    model = small_vdm(schedule, perturb=0.05)
    new = model.sample(4, 5, generator=torch.Generator().manual_seed(3), sample_x=sample_x)
    old = _todays_vdm_sample(model, 4, 5, torch.Generator().manual_seed(3), sample_x=sample_x)
    assert torch.equal(new, old)
    cond = small_vdm(schedule, num_classes=3, perturb=0.05)
    labels = torch.tensor([0, 1, 2, 3])
    new = cond.sample(4, 3, generator=torch.Generator().manual_seed(1), labels=labels, guidance=1.5)
    old = _todays_vdm_sample(cond, 4, 3, torch.Generator().manual_seed(1), labels=labels, guidance=1.5)
    assert torch.equal(new, old)


@pytest.mark.parametrize("spacing", ["time", "lambda"])
@pytest.mark.parametrize("schedule", ["scalar", "nnet"])
def test_ddim_with_eta_1_is_the_ancestral_chain_on_the_same_noise(schedule, spacing):
    """sqrt(sigma_s^2 - v) eps + alpha_s x_hat with v = sigma_s^2 (1 - SNR_t / SNR_s) is the mean of
    q(z_s | z_t, x_hat), and v its variance: the two chains are one, noise for noise. (On the
    smooth Gaussian model over many steps; a random U-Net's Fourier features of z, at 2^7 cycles
    per unit, amplify rounding by ~10^3 a step, so it is held to two.)"""
    for model, steps in ((gaussian_vdm(schedule), 30), (small_vdm(schedule, perturb=0.05, dtype=torch.float64), 2)):
        z_1 = torch.randn(3, *model.image_shape, dtype=torch.float64)
        run = lambda sampler, eta: samplers.denoise(model, z_1, steps, sampler, eta=eta, spacing=spacing,  # noqa: E731
                                                    generator=torch.Generator().manual_seed(2))
        ancestral = run("ancestral", None)
        assert_close(run("ddim", 1.0), ancestral, 1e-10)
        assert not torch.allclose(ancestral, run("ddim", 0.0))


def test_samplers_refuse_bad_arguments():
    model = small_vdm()
    with pytest.raises(ValueError, match="sampler must be one of"):
        model.sample(2, 3, sampler="euler")
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        model.sample(2, 3, sampler="dpm-solver", eta=0.5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        model.sample(2, 3, sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="spacing must be one of"):
        model.sample(2, 3, sampler="ddim", spacing="karras")
    with pytest.raises(ValueError, match="T must be > 0"):
        model.sample(2, 0, sampler="dpm-solver")


# --- exactness on the Gaussian model ------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["fixed", "nnet"])
def test_the_deterministic_samplers_converge_to_the_probability_flow_solution_at_their_order(schedule):
    model = gaussian_vdm(schedule)
    z_1 = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    exact = flow_solution(model, z_1, 0.2)
    ddim = [error(model, z_1, exact, n, "ddim") for n in (40, 80, 160)]
    dpm = [error(model, z_1, exact, n, "dpm-solver") for n in (20, 40, 80)]
    assert 1.8 < ddim[0] / ddim[1] < 2.2 and 1.8 < ddim[1] / ddim[2] < 2.2  # first order
    assert 3.5 < dpm[0] / dpm[1] < 4.5 and 3.5 < dpm[1] / dpm[2] < 4.5  # second order
    assert dpm[-1] < 1e-3
    # both converge to one z_0, DPM-Solver++ with far fewer steps
    assert_close(samplers.denoise(model, z_1, 640, "ddim"), samplers.denoise(model, z_1, 80, "dpm-solver"), 5e-3)
    assert error(model, z_1, exact, 20, "dpm-solver") < error(model, z_1, exact, 160, "ddim")


def test_dpm_solver_is_second_order_on_the_time_grid_too_and_ddim_on_the_lambda_grid():
    model = gaussian_vdm("nnet")
    z_1 = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    exact = flow_solution(model, z_1, 0.2)
    dpm = [error(model, z_1, exact, n, "dpm-solver", spacing="time") for n in (40, 80)]
    ddim = [error(model, z_1, exact, n, "ddim", spacing="lambda") for n in (40, 80)]
    assert 3.5 < dpm[0] / dpm[1] < 4.5 and 1.8 < ddim[0] / ddim[1] < 2.2


@pytest.mark.parametrize("sampler,eta", [("ancestral", None), ("ddim", 0.5), ("dpm-solver-sde", None)])
def test_the_stochastic_samplers_keep_the_data_mean(sampler, eta):
    """With the exact denoiser E[z_s] = alpha_s mu at every step of each chain, so z_0's mean is
    alpha_0 mu at any number of steps. Its variance approaches alpha_0^2 s^2 + sigma_0^2, for the
    first-order chains from below (each step's noise leaves out Var(x | z_t), Bao et al. 2022)."""
    model = gaussian_vdm("nnet")
    a0, s0 = alpha_sigma(model.gamma(torch.zeros(1, dtype=torch.float64))[0])
    var = (a0**2 * 0.09 + s0**2).item()
    ratios = []
    for steps in (20, 200):
        g = torch.Generator().manual_seed(0)
        z_1 = torch.randn(64, 1, 8, 8, generator=g, dtype=torch.float64)
        z_0 = samplers.denoise(model, z_1, steps, sampler, eta=eta, generator=g)
        assert abs(z_0.mean().item() - a0.item() * 0.2) < 5 * (var / z_0.numel()) ** 0.5
        ratios.append(z_0.var().item() / var)
    assert 0.85 < ratios[1] < 1.05
    if sampler != "dpm-solver-sde":
        assert ratios[0] < ratios[1]


def test_sde_dpm_solver_is_the_ancestral_sampler_made_second_order():
    """Its first-order step is the ancestral step (noise for noise), and its data prediction's
    multistep correction brings z_0's variance to the data's in far fewer steps."""
    z, x, noise = (torch.randn(2, 1, 3, 3, dtype=torch.float64) for _ in range(3))
    gamma_t, gamma_s = torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([-1.0, 2.5], dtype=torch.float64)
    alpha_t, sigma_t = alpha_sigma(per_example(gamma_t, z))
    eps = (z - alpha_t * x) / sigma_t
    assert_close(samplers.sde_dpm_solver_step(z, x, gamma_t, gamma_s, noise),
                 ancestral_step(z, eps, gamma_t, gamma_s, noise), 1e-14)
    model = gaussian_vdm("nnet")
    a0, s0 = alpha_sigma(model.gamma(torch.zeros(1, dtype=torch.float64))[0])
    var = (a0**2 * 0.09 + s0**2).item()

    def ratio(sampler, steps):
        g = torch.Generator().manual_seed(0)
        z_1 = torch.randn(256, 1, 8, 8, generator=g, dtype=torch.float64)
        return samplers.denoise(model, z_1, steps, sampler, spacing="lambda", generator=g).var().item() / var

    assert abs(ratio("dpm-solver-sde", 20) - 1) < 0.08 and abs(ratio("ancestral", 20) - 1) > 0.2
    assert abs(ratio("dpm-solver-sde", 100) - 1) < 0.02


# --- classifier-free guidance and labels --------------------------------------------------------

def test_guided_deterministic_samplers_solve_the_guided_flow_exactly():
    model = gaussian_vdm("nnet", means=(0.3, -0.2, 0.05), num_classes=2)
    labels = torch.tensor([0, 1, 1, 0])
    z_1 = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    w = 1.5
    guided_mean = (1 + w) * model.score_net.means.detach()[labels] - w * 0.05
    exact = flow_solution(model, z_1, guided_mean)
    assert error(model, z_1, exact, 80, "dpm-solver", labels=labels, guidance=w) < 1e-3
    assert error(model, z_1, exact, 400, "ddim", labels=labels, guidance=w) < 1e-2
    unguided = flow_solution(model, z_1, model.score_net.means.detach()[labels])
    assert error(model, z_1, unguided, 80, "dpm-solver", labels=labels) < 1e-3


@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_each_sampler_samples_a_conditional_model_with_guidance(sampler, eta):
    model = small_vdm(num_classes=3, perturb=0.05)
    labels = torch.tensor([0, 1, 2, 3])  # 3: the null class
    run = lambda w: model.sample(4, 3, generator=torch.Generator().manual_seed(0), labels=labels, guidance=w,  # noqa: E731
                                 sampler=sampler, eta=eta)
    plain, guided = run(0.0), run(4.0)
    assert plain.shape == guided.shape == (4, 1, 6, 6) and guided.dtype == torch.int64
    assert torch.equal(guided, run(4.0)) and not torch.equal(plain, guided)
    with pytest.raises(ValueError, match="samples with labels"):
        model.sample(4, 3, sampler=sampler, eta=eta)
    calls = []
    original = model.predict_eps

    def spy(z, gamma, labels_, guidance):
        calls.append((labels_, guidance))
        return original(z, gamma, labels_, guidance)

    model.predict_eps = spy
    run(2.0)
    assert len(calls) == 3 and all(torch.equal(c[0], labels) and c[1] == 2.0 for c in calls)
    assert samplers.network_evaluations(3, guided=True) == 6


# --- t(lambda) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["fixed", "scalar", "nnet", "pinned"])
def test_the_schedule_inverts_exactly(kind, dtype):
    schedule = curved_schedule(kind).to(dtype)
    t = torch.cat([torch.rand(200, dtype=dtype), torch.tensor([0.0, 1.0, 0.5, 1e-7], dtype=dtype)])
    gamma = schedule(t)[0].detach()
    inverse = samplers.invert_schedule(schedule, gamma)
    assert inverse.dtype == dtype and inverse.shape == t.shape
    assert (inverse - t).abs().max().item() <= 1e-6
    if dtype == torch.float64:
        assert (inverse - t).abs().max().item() <= 1e-12
    grid = samplers.invert_schedule(schedule, gamma.reshape(4, -1))
    assert grid.shape == (4, 51)


def test_a_plain_callable_schedule_inverts_and_bad_ones_are_refused():
    t = torch.rand(100, dtype=torch.float64) * 0.9 + 0.1
    square = lambda u: -7.0 + 12.0 * u**2  # noqa: E731
    assert (samplers.invert_schedule(square, square(t)) - t).abs().max() < 1e-12
    with pytest.raises(ValueError, match="must be increasing"):
        samplers.invert_schedule(lambda u: 5.0 - 12.0 * u, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"gamma must lie in \[gamma\(0\), gamma\(1\)\]"):
        samplers.invert_schedule(square, torch.tensor([5.5], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["scalar", "nnet", "pinned"])
def test_the_lambda_grid_is_uniform_in_log_snr_from_gamma_1_to_gamma_0(kind):
    model = vnn.VDM(vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=0), curved_schedule(kind), (1, 4, 4),
                    vocab_size=17).double()
    t, gamma = samplers.time_grid(model, 16, "lambda")
    assert t[0] == 1.0 and t[-1] == 0.0 and (t[1:] < t[:-1]).all()
    ends = model.gamma(torch.tensor([1.0, 0.0], dtype=torch.float64))[0]
    assert_close(gamma, torch.linspace(ends[0].item(), ends[1].item(), 17, dtype=torch.float64), 1e-12)


# --- the command line ---------------------------------------------------------------------------

def test_the_cli_writes_npy_integer_images_and_png_grids(tiny_ckpt, tmp_path, capsys):
    from vdm_fast.training import sample as cli
    from vdm_fast.io import load_model_or_exit

    model = load_model_or_exit(str(tiny_ckpt))[0].eval()
    today = tmp_path / "today.npy"
    cli.main(["--ckpt", str(tiny_ckpt), "--n", "5", "--T", "3", "--out", str(today), "--device", "cpu"])
    arr = np.load(today, allow_pickle=False)
    assert arr.dtype == np.int64 and arr.shape == (5, 1, 8, 8) and arr.min() >= 0 and arr.max() < 17
    assert np.array_equal(arr, model.sample(5, 3, generator=torch.Generator().manual_seed(0)).numpy())
    assert "ancestral, 3 steps, 3 network evaluations" in capsys.readouterr().out
    for sampler, extra in (("ddim", ["--eta", "0.5"]), ("dpm-solver", ["--spacing", "time"])):
        out = tmp_path / f"{sampler}.npy"
        cli.main(["--ckpt", str(tiny_ckpt), "--n", "4", "--sampler", sampler, "--steps", "4", *extra,
                  "--out", str(out), "--device", "cpu", "--seed", "7"])
        expected = model.sample(4, 4, generator=torch.Generator().manual_seed(7), sampler=sampler,
                                eta=0.5 if sampler == "ddim" else None, spacing=None if sampler == "ddim" else "time")
        assert np.array_equal(np.load(out), expected.numpy())
    png = tmp_path / "grid.png"
    cli.main(["--ckpt", str(tiny_ckpt), "--n", "4", "--sampler", "dpm-solver", "--steps", "3", "--out", str(png),
              "--device", "cpu"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        cli.main(["--ckpt", str(tiny_ckpt), "--sampler", "dpm-solver", "--eta", "0.5", "--out", str(png)])
    with pytest.raises(SystemExit):
        cli.main(["--ckpt", str(tiny_ckpt), "--steps", "0", "--out", str(png)])
