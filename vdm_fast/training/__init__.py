"""The training driver and the command-line jobs built on the library: ``train`` (the loop and
its step), ``optim`` (the official optimiser recipe), ``run`` (a run folder's lock, metrics log
and stop requests), ``data`` (datasets from local files), ``distributed`` (torchrun jobs),
``evaluate`` (test bits per dim), ``sample``, ``export``, ``curves`` (a run's plots and
TensorBoard events) and ``images`` (PNG grids). Nothing in the library imports this package."""
