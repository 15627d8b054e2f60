"""Equivariant math: spherical harmonics, Wigner-D / edge frames, CG, Gaunt and SO(2) tensor products.

Each helper module exports its public names here (one block per module).
"""
# -- spherical harmonics, Wigner-D, edge frames, SO(2) (spherical_harmonics.py, wigner.py, so2.py)
# -- Gaunt products (gaunt.py)
# -- channelwise CG tensor product, symmetric contraction (tensor_product.py, symmetric_contraction.py)
