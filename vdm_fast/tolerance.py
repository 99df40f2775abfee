"""How close two correct implementations of an op must agree, per dtype: the one table the tests
and ``python -m vdm_fast.check`` use. Relative to the largest magnitude compared
(``max |a - b| <= RTOL * max |b|``), against the reference computed in float64 where the other
side is lower precision."""

import torch

RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
