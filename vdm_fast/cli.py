"""The installed command ``vdm-fast``: one entry to the package's command-line tools.

    vdm-fast train [flags]              (python -m vdm_fast.training.train)
    vdm-fast evaluate --ckpt CKPT       (python -m vdm_fast.training.evaluate)
    vdm-fast sample --ckpt CKPT         (python -m vdm_fast.training.sample)
    vdm-fast compress encode|decode     (python -m vdm_fast.codec.compress)
    vdm-fast export --ckpt CKPT --out D (python -m vdm_fast.training.export)
    vdm-fast check [--device cuda]      (python -m vdm_fast.check)
    vdm-fast curves RUN_DIR             (python -m vdm_fast.training.curves)
    vdm-fast convert CKPT --out D       (python -m vdm_fast.integrations.official)

Each subcommand hands the rest of the command line to that module's ``main(argv)``, so its flags
and its ``--help`` are the module's own. A console script does not put the working directory on
``sys.path``: from a source checkout's root it still runs the installed build (with its compiled
``vdm_fast._C`` and ``vdm_fast.kernels``), where ``python -m vdm_fast.training.train`` would find the source
folder. Each module is imported only when its subcommand runs, so ``vdm-fast --help`` imports
none of the extras.
"""

import argparse
import importlib
import sys

# subcommand -> (module whose main(argv) it runs, one line for vdm-fast --help)
COMMANDS = {
    "train": ("vdm_fast.training.train", "train a VDM and report its test bits per dim (default: the bundled digits, CPU)"),
    "evaluate": ("vdm_fast.training.evaluate", "test bits per dim of a checkpoint, with its EMA weights"),
    "sample": ("vdm_fast.training.sample", "draw samples from a checkpoint (ancestral, DDIM, DPM-Solver++) as a PNG grid or .npy"),
    "compress": ("vdm_fast.codec.compress", "bits-back lossless compression: encode | decode"),
    "export": ("vdm_fast.training.export", "write a checkpoint's weights as model.safetensors + config.json"),
    "check": ("vdm_fast.check", "self-test every op on this device against its reference; prints the build"),
    "curves": ("vdm_fast.training.curves", "redraw a run folder's learning curves and learned schedule (curves.png)"),
    "convert": ("vdm_fast.integrations.official",
                "convert an official VDM checkpoint (google-research/vdm, JAX/Flax) to model.safetensors + config.json"),
}


def _parser() -> argparse.ArgumentParser:
    from vdm_fast import __version__

    parser = argparse.ArgumentParser(
        prog="vdm-fast",
        description="Variational Diffusion Models with fused kernels: the command-line tools.",
        epilog="'vdm-fast COMMAND --help' lists a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"vdm_fast {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv=None) -> int:
    """Run ``vdm-fast`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status (a
    subcommand's ``SystemExit``, e.g. a usage error or ``--help``, propagates)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _parser()
        if not argv:
            parser.print_help(sys.stderr)
            return 2
        parser.parse_args(argv)  # --help / --version exit 0; an unknown command exits 2 with the choices
        parser.print_help(sys.stderr)  # not reached for any argv argparse accepts without a command
        return 2
    module_name, _ = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)  # lazily: only the subcommand that runs
    status = module.main(argv[1:], prog=f"vdm-fast {argv[0]}")
    # check returns its exit status; the others return None (or a report) and exit through
    # SystemExit on failure.
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
