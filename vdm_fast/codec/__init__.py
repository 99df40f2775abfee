"""Bits-back lossless compression with a trained VDM: ``bitsback`` (the coder and its chain) and
``compress`` (the file format and ``vdm-fast compress``)."""
