"""Drop-in VDM ops for an existing trainer.

Each op validates its inputs, then runs the fastest backend for the tensors' device: the
compiled kernels of ``vdm_fast._C`` (C++ on CPU, CUDA), or the pure-PyTorch reference where no
kernel exists or ``VDM_FAST_BACKEND=reference`` asks for it.
"""

from vdm_fast.ops.loss import (diffuse, diffusion_loss, diffusion_loss_discrete, prior_loss,
                               reconstruction_loss)

__all__ = ["diffuse", "diffusion_loss", "diffusion_loss_discrete", "prior_loss",
           "reconstruction_loss"]
