"""mlpot.voigt, the one stress conversion, against ASE's own (ase.stress)."""
from __future__ import annotations

import numpy as np
import pytest
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

from mlpot.errors import DataError
from mlpot.voigt import as_full_3x3, as_voigt, full_3x3_to_voigt, vasp_order_to_voigt, voigt_to_full_3x3


def _symmetric(rng, shape):
    a = rng.normal(size=(*shape, 3, 3))
    return a + np.swapaxes(a, -1, -2)


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
def test_matches_ase_for_any_batch_shape(shape):
    rng = np.random.default_rng(0)
    s = _symmetric(rng, shape)
    v = full_3x3_to_voigt(s)
    assert v.shape == (*shape, 6)
    flat_s, flat_v = s.reshape(-1, 3, 3), v.reshape(-1, 6)
    for k in range(len(flat_s)):
        np.testing.assert_array_equal(flat_v[k], full_3x3_to_voigt_6_stress(flat_s[k]))
        np.testing.assert_array_equal(voigt_to_full_3x3(flat_v[k]), voigt_6_to_full_3x3_stress(flat_v[k]))
    np.testing.assert_array_equal(voigt_to_full_3x3(v), s)


def test_component_order_is_xx_yy_zz_yz_xz_xy():
    s = np.array([[1.0, 6.0, 5.0], [6.0, 2.0, 4.0], [5.0, 4.0, 3.0]])
    np.testing.assert_array_equal(full_3x3_to_voigt(s), full_3x3_to_voigt_6_stress(s))
    np.testing.assert_array_equal(as_voigt(s), [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(as_full_3x3([1, 2, 3, 4, 5, 6]), s)
    np.testing.assert_array_equal(as_full_3x3(s.reshape(9)), s)


def test_vasp_order():
    """VASP lists xx yy zz xy yz zx."""
    s = _symmetric(np.random.default_rng(1), ())
    vasp = np.array([s[0, 0], s[1, 1], s[2, 2], s[0, 1], s[1, 2], s[2, 0]])
    np.testing.assert_array_equal(vasp_order_to_voigt(vasp), full_3x3_to_voigt_6_stress(s))


def test_wrong_number_of_components_is_a_data_error():
    with pytest.raises(DataError, match="6 \\(Voigt\\) or 9 components"):
        as_full_3x3(np.zeros(5))
