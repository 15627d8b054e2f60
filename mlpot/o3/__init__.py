"""Equivariant math: spherical harmonics, Wigner-D / edge frames, CG, Gaunt and SO(2) tensor products.

Each helper module exports its public names here (one block per module).
"""
# -- spherical harmonics, Wigner-D, edge frames, SO(2) (spherical_harmonics.py, wigner.py, so2.py)
from mlpot.o3.gaunt import (  # noqa: E402,F401
    GauntMessageTP,
    GauntProductBasis,
    GauntTensorProduct,
    gaunt_paths,
    gaunt_product,
    weighted_gaunt_product,
)

# -- the two interfaces of the core (message_passing.py, product_basis.py) and the layouts (layout.py)
from mlpot.o3.layout import (  # noqa: F401
    channel_last_to_mul_ir,
    channels_first_to_mul_ir,
    mul_ir_to_channel_last,
    mul_ir_to_channels_first,
)
from mlpot.o3.message_passing import EdgeGeometry, MessageTensorProduct  # noqa: F401
from mlpot.o3.product_basis import ProductBasis  # noqa: F401

# -- Gaunt products (gaunt.py)
from mlpot.o3.s2grid import S2Grid, TorusFourierGrid  # noqa: E402,F401
from mlpot.o3.so2 import (  # noqa: F401
    EdgeFrameRotation,
    SO2Convolution,
    SO2Linear,
    SO2MessageTP,
    SO2Plan,
    cg_message_reference,
    edge_frame_index,
    mul_ir_to_sph_channels,
    so2_conv,
    so2_message_passing,
    so2_weights_from_cg,
    sph_channels_to_mul_ir,
)
from mlpot.o3.spherical_harmonics import SphericalHarmonics, sh_dim, spherical_harmonics  # noqa: F401
from mlpot.o3.symmetric_contraction import SymmetricContraction, coupling_basis  # noqa: F401

# -- channelwise CG tensor product, symmetric contraction (tensor_product.py, symmetric_contraction.py)
from mlpot.o3.tensor_product import (  # noqa: F401
    ChannelwiseTensorProduct,
    channelwise_instructions,
)
from mlpot.o3.wigner import (  # noqa: F401
    angles_to_matrix,
    edge_rotation,
    wigner_D,
    wigner_D_blocks,
    wigner_D_list,
)
