"""Grimme's DFT-D3 dispersion added to a potential's energy, forces and stress.

``E_total = E_model + E_D3``; forces and stress add the same way (``F = -dE/dx``,
``sigma = (1/V) dE/d(strain)`` for both terms). ``E_D3`` is evaluated by ``torch-dftd``
(:class:`torch_dftd.torch_dftd3_calculator.TorchDFTD3Calculator`, float64), which handles
periodic cells and stress. ``tad-dftd3`` was measured too (``scripts/bench_d3.py``) but its
``dftd3()`` (0.7) takes no cell, so it cannot give a periodic energy or a stress; see
BENCHMARKS.md "D3 dispersion".

``dispersion`` names the damping: ``"d3bj"`` (Becke-Johnson, the usual choice for an MLIP
trained on PBE data) or ``"d3zero"``; ``xc`` names the functional whose D3 parameters apply
(``"pbe"``, ``"pbesol"``, ``"r2scan"``, ... as torch-dftd spells them). Install with
``pip install mlpot[d3]``. ``cutoff`` (Å) defaults to torch-dftd's 95 Bohr (50.3 Å), the
standard D3 energy cutoff; small periodic cells have many images within it (an 8-atom Cu cell
takes seconds on a CPU), so a smaller cutoff trades a little accuracy for speed.
"""
from __future__ import annotations

import numpy as np

from mlpot.errors import ConfigError

__all__ = ["D3Dispersion", "DAMPINGS"]

DAMPINGS = {"d3bj": "bj", "d3zero": "zero"}


class D3Dispersion:
    """Adds D3 energy, forces and (periodic cells) stress to a results dict."""

    def __init__(self, dispersion: str | None, xc: str | None, cutoff: float | None = None):
        if dispersion not in DAMPINGS:
            raise ConfigError(f"dispersion={dispersion!r}: use one of {sorted(DAMPINGS)}")
        if not isinstance(xc, str) or not xc:
            raise ConfigError(f"dispersion={dispersion!r} needs the functional, e.g. xc='pbe' (got {xc!r})")
        try:
            from torch_dftd.torch_dftd3_calculator import TorchDFTD3Calculator
        except ImportError as exc:
            raise ConfigError(f"dispersion={dispersion!r} needs torch-dftd: pip install 'mlpot[d3]' ({exc})") from None
        import torch

        extra = {}
        if cutoff is not None:
            if not (float(cutoff) > 0 and np.isfinite(cutoff)):
                raise ConfigError(f"dispersion_cutoff must be a finite number > 0 (Å), got {cutoff}")
            extra["cutoff"] = float(cutoff)
        try:
            self.calc = TorchDFTD3Calculator(damping=DAMPINGS[dispersion], xc=xc.lower(), device="cpu",
                                             dtype=torch.float64, **extra)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"xc={xc!r}: no D3 parameters in torch-dftd for it ({exc})") from None
        self.dispersion, self.xc = dispersion, xc

    def evaluate(self, atoms, stress: bool) -> dict:
        """D3 energy (eV), forces (eV/Å) and, when asked, stress (eV/Å^3, ASE Voigt)."""
        a = atoms.copy()
        a.calc = None
        props = ["energy", "forces"] + (["stress"] if stress else [])
        self.calc.calculate(a, properties=props)
        r = self.calc.results
        out = {"energy": float(r["energy"]), "forces": np.asarray(r["forces"], dtype=np.float64)}
        if stress:
            out["stress"] = np.asarray(r["stress"], dtype=np.float64)
        return out

    def add_to(self, results: dict, atoms, stress: bool) -> None:
        """Add the D3 terms to a calculator's results in place (``d3_energy`` keeps the part)."""
        d3 = self.evaluate(atoms, stress and "stress" in results)
        results["energy"] = results["energy"] + d3["energy"]
        results["free_energy"] = results["free_energy"] + d3["energy"]
        results["forces"] = results["forces"] + d3["forces"]
        if "stress" in d3:
            results["stress"] = results["stress"] + d3["stress"]
        results["d3_energy"] = d3["energy"]
