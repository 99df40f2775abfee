"""The compiled and the captured training step: --compile trains what eager trains (up to float
rounding), resumes exactly and keeps the non-finite guards; a machine that cannot run --compile or
--cuda-graphs is refused before anything is written."""

import math
import os
import subprocess
import sys

import pytest
import torch

from vdm_fast import config
from vdm_fast.training import train
from vdm_fast.training.distributed import Distributed

# The tiny digits model of the compiled runs: the defaults otherwise (lr 3e-3 after 100 warm-up
# steps, batch 64, no dropout), the same seed.
TINY = ["--n-embd", "32", "--n-layer", "0"]
STEPS = 20


def _run(tmp_path, name, *flags):
    cfg = config.parse_args([*TINY, "--out-dir", str(tmp_path / name), *flags])
    (tmp_path / name).mkdir(exist_ok=True)
    return train.Run(cfg, Distributed("cpu"))


def _steps(run, n):
    """The bound (mean bits per dim) of each of ``n`` steps."""
    return [run.train_step()[0].bpd.mean().item() for _ in range(n)]


def _movement(run, start):
    """How far training moved each parameter tensor from ``start``, at most."""
    return max((p.detach() - s).abs().max().item() for p, s in zip(run.params, start))


@pytest.mark.slow
def test_compiled_steps_train_what_eager_steps_train(tmp_path):
    """20 steps eager and 20 compiled, same seed: the bound of every step agrees to 1e-5 relative
    and the weights to 5 % of how far training moved them.

    Why these bounds: inductor fuses the elementwise work and may reorder float32 sums (the
    bound's terms over an image, the time embedding), so the two runs differ by float32 rounding
    (relative 1.2e-7 per operation): measured 1e-7 relative on the bound (2026-12-07, AMD EPYC
    AVX2). Through AdamW such differences grow on weights whose gradients are near rounding level,
    where the normalised update's sign is noise: measured 1 % of the movement after 20 steps
    (6.4e-5 of 5.7e-3). A wrong compiled step (a dropped term, a gradient not applied) misses
    either bound by orders of magnitude."""
    eager, compiled = _run(tmp_path, "eager"), _run(tmp_path, "compiled", "--compile")
    start = [p.detach().clone() for p in eager.params]
    assert all(torch.equal(a, b) for a, b in zip(start, compiled.params))  # the same initial model
    bound_eager, bound_compiled = _steps(eager, STEPS), _steps(compiled, STEPS)
    for step, (a, b) in enumerate(zip(bound_eager, bound_compiled)):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step + 1}: bound {b} compiled, {a} eager"
    moved = _movement(eager, start)
    assert moved > 1e-3  # the steps trained: the comparison below is not between two idle models
    for name, a, b in (("weights", eager.params, compiled.params), ("EMA", eager.ema, compiled.ema)):
        diff = max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b))
        assert diff <= 0.05 * moved, f"{name} differ by {diff:.3g}; training moved them by {moved:.3g}"


@pytest.mark.slow
def test_a_compiled_run_resumes_exactly(tmp_path):
    """10 compiled steps, a checkpoint, and 10 more in a new compiled run from it: the state of 20
    compiled steps in one run, bit for bit."""
    straight = _run(tmp_path, "straight", "--compile")
    _steps(straight, STEPS)
    first = _run(tmp_path, "resumed", "--compile")
    _steps(first, STEPS // 2)
    assert first.save_checkpoint()
    second = _run(tmp_path, "resumed", "--compile", "--resume")
    assert second.step == STEPS // 2
    _steps(second, STEPS // 2)
    for a, b in zip(straight.state_dict()["model"].values(), second.state_dict()["model"].values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(straight.ema, second.ema))


@pytest.mark.slow
def test_compiled_steps_keep_the_non_finite_guards(tmp_path, monkeypatch):
    """Compiled: steps whose noise holds a NaN are skipped on the device (weights, EMA and AdamW's
    state unchanged), counted, and stop the run after max_bad_steps; an update that makes the
    weights infinite stops it at once."""
    run = _run(tmp_path, "nan", "--compile", "--max-bad-steps", "3")
    _steps(run, 4)
    weights, ema = [p.detach().clone() for p in run.params], [e.clone() for e in run.ema]
    adam = [s["exp_avg"].clone() for s in run.optimizer.state.values()]
    clean = train.Run.step_inputs

    def poisoned(self, step):
        inputs = clean(self, step)
        inputs["eps"][0, 0, 0, 0] = math.nan
        return inputs

    monkeypatch.setattr(train.Run, "step_inputs", poisoned)
    for _ in range(2):
        _, _, grad_norm = run.train_step()
        assert not math.isfinite(grad_norm)
    assert (run.step, run.skipped, run.bad_in_row) == (6, 2, 2)
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights, run.params))
    assert all(torch.equal(a, b) for a, b in zip(ema, run.ema))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(adam, run.optimizer.state.values()))
    with pytest.raises(train.NonFiniteLoss, match="3 steps in a row"):
        run.train_step()
    monkeypatch.undo()

    blown = _run(tmp_path, "inf", "--compile", "--lr", "1e39", "--warmup", "0")
    with pytest.raises(train.NonFiniteLoss, match="made the weights non-finite"):
        blown.train_step()


def test_the_fused_ops_are_single_nodes_of_one_compiled_graph():
    """torch.compile of the model traces it whole (fullgraph) with every fused op as one node of
    the graph, not decomposed into its kernels' Python and not a graph break."""
    from vdm_fast.factory import build_model

    cfg = config.parse_args([*TINY, "--schedule", "nnet"])
    torch.manual_seed(0)
    model = build_model(cfg, (1, 8, 8), 17)
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randint(0, 17, (4, 1, 8, 8))
    out = torch.compile(model, backend=record, fullgraph=True)(x, t=torch.rand(4), eps=torch.randn(4, 1, 8, 8),
                                                                eps_0=torch.randn(4, 1, 8, 8))
    out.bpd.mean().backward()
    fused = {f"vdm_fast.{name}.default" for name in ("gamma_nnet", "group_norm_silu", "diffuse",
                                                      "sum_squared_error", "reconstruction_loss")}
    assert fused <= set(seen), sorted(fused - set(seen))


def test_cuda_graphs_on_the_cpu_is_refused_by_name_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="--cuda-graphs .* needs --device cuda"):
        config.parse_args([*TINY, "--device", "cpu", "--cuda-graphs"])
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device auto would capture there")
    out = tmp_path / "run"
    cfg = config.parse_args([*TINY, "--cuda-graphs", "--out-dir", str(out)])
    with pytest.raises(SystemExit, match="--cuda-graphs captures CUDA work, and no CUDA GPU is available"):
        train.train(cfg)
    assert not out.exists()


@pytest.mark.slow
def test_compile_without_a_working_compiler_is_refused_by_name_before_anything_is_written(tmp_path):
    """No C++ compiler for inductor's CPU code (CXX=/bin/false, a fresh cache so nothing compiled
    earlier is reused): the run stops at start, naming --compile; no run folder is made."""
    out = tmp_path / "run"
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-m", "vdm_fast.training.train", *TINY, "--compile", "--device", "cpu",
                           "--out-dir", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd="/")
    assert proc.returncode != 0
    assert "error: --compile needs a working torch.compile on cpu" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()
