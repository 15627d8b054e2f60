"""Triton GPU kernels (installed as ``mlpot.kernels``); each has a torch reference in mlpot.o3."""
