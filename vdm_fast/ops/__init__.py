"""Drop-in VDM ops for an existing trainer.

The dtype rule: ``diffuse``, ``encode`` and the loss ops compute and return float32, or float64
when their data (images, noises, predictions) is float64; a gamma of another dtype is cast to
that, never the other way (a float64 gamma does not make ``z_t`` float64). ``gamma_nnet`` takes
and returns its ``t``'s dtype (float32 or float64, the parameters' too). ``group_norm_silu`` and
``attention_block`` return ``x``'s dtype, with statistics in float32 (float64 for float64).
Every gamma argument takes one value per example in any shape that broadcasts to it: a number,
``()``, ``[1]``, ``[B]`` or ``[B, 1, ..., 1]``.

Each op validates its inputs, then runs what ``vdm_fast.backend`` chooses for the tensors'
device: the C++ kernels of ``vdm_fast._C`` on CPU, Triton kernels on GPU, or the function of the
same name in ``vdm_fast.reference`` where no kernel exists or the reference backend is chosen
(``VDM_FAST_BACKEND=reference``, or ``with vdm_fast.backend.use("reference"):``).
"""

from vdm_fast.ops.attention import attention_block
from vdm_fast.ops.loss import (VLBTerms, diffuse, diffusion_loss, diffusion_loss_discrete, encode, prior_loss,
                               reconstruction_loss, vlb_terms)
from vdm_fast.ops.norm import group_norm_silu
from vdm_fast.ops.schedule import gamma_nnet, gamma_nnet_pinned, variance_gradients

__all__ = ["VLBTerms", "attention_block", "diffuse", "diffusion_loss", "diffusion_loss_discrete", "encode", "gamma_nnet",
           "gamma_nnet_pinned", "group_norm_silu", "prior_loss", "reconstruction_loss", "variance_gradients",
           "vlb_terms"]
