"""Triton GPU kernels and compiled CPU kernels (installed as ``mlpot.kernels``), each tested against a torch reference.

CPU kernels: ``cpu_kernels.c`` (C, built on first use by ``cpu``; backend ``cpu``), with
``symmetric_contraction_cpu`` (the product basis at inference).

Modules: ``spherical_harmonics`` (SH + Bessel x cutoff), ``channelwise_tp`` (fused MACE message
passing; its kernels are generated per CG table by ``mp_codegen``), ``symmetric_contraction``, ``gaunt`` (S2-grid product), ``so2`` (fused SO(2) message
passing); the layout conversions at their boundaries are :mod:`mlpot.o3.layout`'s. Kernels are jitted at their first launch; they run
on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. Choose them through
:mod:`mlpot.o3.backend` (the registry of ``(op, backend)`` implementations).
"""
