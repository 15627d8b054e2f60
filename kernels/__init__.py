"""Triton GPU kernels (installed as ``mlpot.kernels``), each tested against a torch reference.

Modules: ``spherical_harmonics`` (SH + Bessel x cutoff), ``channelwise_tp`` (fused MACE message
passing; its kernels are generated per CG table by ``mp_codegen``), ``symmetric_contraction``, ``gaunt`` (S2-grid product), ``so2`` (fused SO(2) message
passing); the layout conversions at their boundaries are :mod:`mlpot.o3.layout`'s. Kernels are jitted at their first launch; they run
on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. Choose them through
:mod:`mlpot.o3.backend` (the registry of ``(op, backend)`` implementations).
"""
