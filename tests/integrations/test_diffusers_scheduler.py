"""The diffusers scheduler (``integrations/diffusers_scheduler.py``, the ``integrations`` extra):
a diffusers sampling loop with ``VDMScheduler`` computes what vdm_fast's samplers do, for every
sampler and schedule, guided or not, with a random U-Net VDM or a diffusers U-Net in the loop."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import SAMPLERS, assert_close, curved_schedule, gaussian_vdm, small_vdm, torchvision_or_stub

from vdm_fast import nn as vnn
from vdm_fast import samplers
from vdm_fast.integrations.adapters import from_diffusers


def test_importing_vdm_fast_never_imports_diffusers():
    code = ("import sys, vdm_fast, vdm_fast.nn, vdm_fast.samplers, vdm_fast.training.sample; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/",
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr


def _diffusers_loop(scheduler, eps_model, shape, steps, seed, dtype=torch.float64):
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=dtype)
    for t in scheduler.timesteps:
        z = scheduler.step(eps_model(scheduler.scale_model_input(z, t), t), t, z, generator=g).prev_sample
    return z


@pytest.mark.parametrize("sampler,eta", SAMPLERS)
@pytest.mark.parametrize("schedule", ["fixed", "scalar", "nnet", "pinned"])
def test_a_diffusers_loop_with_the_scheduler_is_vdm_fasts_sampler(schedule, sampler, eta, tmp_path):
    pytest.importorskip("diffusers")
    from vdm_fast.integrations.diffusers_scheduler import VDMScheduler

    model = gaussian_vdm()  # smooth in z: the comparison is not amplified chaos (see the ddim test)
    model.schedule = curved_schedule(schedule).double()
    VDMScheduler.from_vdm(model, sampler=sampler, eta=eta).save_pretrained(tmp_path)
    scheduler = VDMScheduler.from_pretrained(tmp_path)  # the schedule travels in its config
    assert_close(scheduler.gamma(torch.linspace(0, 1, 101)), model.gamma(torch.linspace(0, 1, 101).double())[0], 1e-14)
    g = torch.Generator().manual_seed(4)
    z_1 = torch.randn((3, 1, 8, 8), generator=g, dtype=torch.float64)
    expected = samplers.denoise(model, z_1, 12, sampler, eta=eta, generator=g)
    z_0 = _diffusers_loop(scheduler, scheduler.eps_model(model), (3, 1, 8, 8), 12, seed=4)
    assert_close(z_0, expected, 1e-10)
    if sampler == "ancestral":
        images = model.sample(3, 12, generator=torch.Generator().manual_seed(4))
        assert torch.equal(samplers.decode(model, z_0), images)
        assert torch.equal(scheduler.decode(z_0, model.vocab_size), images)


def test_the_scheduler_runs_a_random_unet_vdm_as_vdm_fast_does():
    pytest.importorskip("diffusers")
    from vdm_fast.integrations.diffusers_scheduler import VDMScheduler

    model = small_vdm("scalar", perturb=0.05, dtype=torch.float64)
    scheduler = VDMScheduler.from_vdm(model)
    z_0 = _diffusers_loop(scheduler, scheduler.eps_model(model), (3, 1, 6, 6), 5, seed=4)
    assert torch.equal(samplers.decode(model, z_0), model.sample(3, 5, generator=torch.Generator().manual_seed(4)))


def test_the_scheduler_guides_and_noises_as_vdm_fast_does():
    pytest.importorskip("diffusers")
    from vdm_fast.integrations.diffusers_scheduler import VDMScheduler
    from vdm_fast.reference.loss import diffuse

    model = gaussian_vdm("nnet", means=(0.3, -0.2, 0.05), num_classes=2)
    labels = torch.tensor([0, 1, 2])
    scheduler = VDMScheduler.from_vdm(model, sampler="dpm-solver")
    g = torch.Generator().manual_seed(1)
    z_1 = torch.randn((3, 1, 8, 8), generator=g, dtype=torch.float64)
    expected = samplers.denoise(model, z_1, 5, "dpm-solver", labels=labels, guidance=2.0)
    z_0 = _diffusers_loop(scheduler, scheduler.eps_model(model, labels, 2.0), (3, 1, 8, 8), 5, seed=1)
    assert_close(z_0, expected, 1e-10)
    assert not torch.allclose(z_0, samplers.denoise(model, z_1, 5, "dpm-solver", labels=labels))
    assert scheduler.timesteps.dtype == torch.float32 and len(scheduler.timesteps) == 5
    assert scheduler.timesteps[0] == 1000.0 and (scheduler.timesteps[1:] < scheduler.timesteps[:-1]).all()
    # add_noise: z_t = alpha_t x + sigma_t eps at the timesteps' gamma
    x, eps = torch.rand(3, 1, 6, 6, dtype=torch.float64) * 2 - 1, torch.randn(3, 1, 6, 6, dtype=torch.float64)
    timesteps = torch.tensor([50.0, 500.0, 975.0])
    gamma = model.gamma(timesteps.double() / 1000)[0].detach()
    assert_close(scheduler.add_noise(x, eps, timesteps), diffuse(x, eps, gamma), 1e-12)
    assert_close(scheduler.gamma_for_timestep(timesteps), gamma, 1e-12)


def test_a_diffusers_unet_in_the_loop_takes_the_schedulers_timesteps_directly():
    """A UNet2DModel behind from_diffusers on a fixed schedule embeds 1000 t: the scheduler's
    timesteps, so the U-Net itself goes in the loop unwrapped."""
    torchvision_or_stub()
    diffusers = pytest.importorskip("diffusers")
    from vdm_fast.integrations.diffusers_scheduler import VDMScheduler

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(32, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    model = vnn.VDM(from_diffusers(unet, -7.0, 5.0), vnn.FixedLinearSchedule(-7.0, 5.0), (1, 8, 8), vocab_size=17)
    scheduler = VDMScheduler.from_vdm(model)
    g = torch.Generator().manual_seed(0)
    z_1 = torch.randn((2, 1, 8, 8), generator=g)
    expected = samplers.denoise(model, z_1, 4, "ancestral", generator=g)
    with torch.no_grad():
        z_0 = _diffusers_loop(scheduler, lambda z, t: unet(z, t).sample, (2, 1, 8, 8), 4, seed=0, dtype=torch.float32)
    assert_close(z_0, expected, 1e-4)
