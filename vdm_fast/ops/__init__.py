"""Drop-in VDM ops for an existing trainer.

Each op validates its inputs, then runs the fastest backend for the tensors' device: the C++
kernels of ``vdm_fast._C`` on CPU, Triton (or CUDA C++) kernels on GPU, or the pure-PyTorch
reference where no kernel exists or ``VDM_FAST_BACKEND=reference`` asks for it.
"""

from vdm_fast.ops.attention import attention_block
from vdm_fast.ops.loss import (VLBTerms, diffuse, diffusion_loss, diffusion_loss_discrete, prior_loss,
                               reconstruction_loss, vlb_terms)

from vdm_fast.ops.norm import group_norm_silu
from vdm_fast.ops.schedule import gamma_nnet, gamma_nnet_pinned, variance_gradients

__all__ = ["VLBTerms", "attention_block", "diffuse", "diffusion_loss", "diffusion_loss_discrete", "gamma_nnet", "gamma_nnet_pinned", "group_norm_silu",
           "prior_loss", "reconstruction_loss", "variance_gradients", "vlb_terms"]
