"""Committee (ensemble) predictions and their spread as an uncertainty.

For ``M`` models evaluated on one structure, with forces ``F_m`` (N, 3):

* the prediction is the mean: ``E = (1/M) sum_m E_m``, ``F = (1/M) sum_m F_m``, same for stress
  and per-atom energies;
* the per-atom force uncertainty is the root-mean-square deviation of the committee forces
  from their mean, ``sigma_i = sqrt((1/M) sum_m |F_{m,i} - F_i|^2)`` (eV/Å, population
  convention, so one model gives 0); ``energy_std`` is the population std of ``E_m``;
* ``max_force_std = max_i sigma_i`` is the single number an MD run watches.

:class:`~mlpot.calculators.MLPotCalculator` (``models=[a, b, c]``) puts these in
``calc.results`` as ``forces_std`` (N,), ``energy_std`` and ``max_force_std``.
"""
from __future__ import annotations

import numpy as np

from mlpot.errors import ConfigError

__all__ = ["committee_mean_and_spread", "check_committee"]


def check_committee(models) -> None:
    """Committee members must share cutoff and elements (one neighbour list serves all)."""
    if len(models) < 2:
        raise ConfigError(f"a committee needs at least 2 models, got {len(models)}")
    r0, z0 = float(models[0].r_max), list(models[0].atomic_numbers)
    for k, m in enumerate(models[1:], start=1):
        if float(m.r_max) != r0 or list(m.atomic_numbers) != z0:
            raise ConfigError(
                f"committee model {k} has r_max {float(m.r_max)} and elements {list(m.atomic_numbers)}; "
                f"model 0 has r_max {r0} and elements {z0}: committee members must share both"
            )


def committee_mean_and_spread(results: list[dict]) -> dict:
    """Mean of each property over the members' results, plus ``forces_std``, ``energy_std`` and
    ``max_force_std`` (see the module docstring)."""
    out = {}
    for key in results[0]:
        out[key] = np.mean([r[key] for r in results], axis=0)
        if key in ("energy", "free_energy"):
            out[key] = float(out[key])
    forces = np.stack([r["forces"] for r in results])  # (M, N, 3)
    dev = forces - forces.mean(axis=0)
    out["forces_std"] = np.sqrt((dev * dev).sum(axis=-1).mean(axis=0))
    out["energy_std"] = float(np.std([r["energy"] for r in results]))
    out["max_force_std"] = float(out["forces_std"].max(initial=0.0))
    return out
