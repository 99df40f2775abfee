"""The VDM math every layer of the package builds on, in plain PyTorch (no kernels, no files):

- ``process``: the forward process's coefficients ``alpha``, ``sigma`` from ``gamma``;
- ``parameterization``: the eps / x / v / score views of the network's output;
- ``times``: antithetic times and the T-step grid;
- ``weighting``: the weightings of the diffusion loss, by name;
- ``sampling``: the ancestral sampling step;
- ``features``: Fourier features and the time embedding of the score network;
- ``pixels``: integer data to ``[-1, 1]`` and back (the decoder), nats to bits per dim;
- ``draws``: a batch's random draws as functions of the seed, the step and each example's
  index in the global batch.
"""
