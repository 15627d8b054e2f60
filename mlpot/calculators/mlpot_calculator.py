"""ASE calculator for any mlpot :class:`~mlpot.models.base.PotentialModel`.

Energies, per-atom energies, forces and (for fully periodic cells) stress, in eV, eV/Å and
eV/Å^3 with ASE's sign and Voigt order (xx, yy, zz, yz, xz, xy).

Neighbour-list reuse (Verlet skin)
----------------------------------
With ``skin > 0`` the neighbour list is built with the cutoff ``r_max + skin`` and kept while
no atom has moved more than ``skin / 2`` since that build (and the cell, pbc, atomic numbers
and atom count are unchanged). On every call the stored candidate pairs are **filtered by
length** (``|D| < r_max``), so the model sees exactly the edges a fresh build would give;
results equal a rebuild up to the order of floating-point sums. Any change of cell, pbc,
species or atom count forces a rebuild.

Each CPU call runs with at most the threads that the machine's other runnable tasks leave cores
for (:func:`mlpot.threads.threads_for_call`; ``MLPOT_CALL_THREADS=fixed`` keeps torch's count).

The edges reach the model sorted by receiver (a stable sort, once per neighbour-list build):
the grouped message passing (:mod:`mlpot.o3.grouped_message_passing`) then reads each node's
edges contiguously, and in a crystal with equal in-degrees without any gather.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from mlpot.data.graph import graph_from_neighbor_list
from mlpot.errors import ConfigError, DataError, NonFiniteError, UnknownElementError
from mlpot.voigt import full_3x3_to_voigt

__all__ = ["MLPotCalculator", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, None: None}


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use float32 or float64")
    return _DTYPES[dtype]


@contextmanager
def _call_threads(device):
    """torch's thread count for one CPU force call: :func:`mlpot.threads.threads_for_call` (no more
    threads than the cores other runnable tasks leave free), restored afterwards."""
    if device.type != "cpu":
        yield
        return
    from mlpot.threads import threads_for_call

    requested = torch.get_num_threads()
    n = threads_for_call(requested)
    if n == requested:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(requested)


def _load(model, device, dtype):
    from mlpot.models.base import PotentialModel

    if isinstance(model, (str, Path)):
        from mlpot.models.io import load_model

        return load_model(model, device=device, dtype=dtype)
    if not isinstance(model, PotentialModel):
        raise ConfigError(f"model must be a path or a PotentialModel, got {type(model).__name__}")
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model


class MLPotCalculator(Calculator):
    """ASE calculator driving an mlpot model.

    Parameters
    ----------
    model: a model file path or a :class:`PotentialModel` instance.
    device: "auto" (CUDA when available), "cpu", "cuda", ...
    dtype: None (the model's own / trained dtype), "float32" or "float64".
    compile: must stay False. ``torch.compile`` of mlpot models does not work yet (dynamo fails
        on e3nn's ``Irreps`` while building guards); ``True`` is a :class:`ConfigError` rather
        than a silent fallback to eager.
    skin: Verlet skin in Å for neighbour-list reuse (0 = rebuild every call).
    models: a committee (list of paths or models, instead of ``model``): results are the means,
        with ``forces_std`` (per atom), ``energy_std`` and ``max_force_std`` as uncertainty
        (:mod:`mlpot.calculators.committee`).
    dispersion, xc, dispersion_cutoff: ``dispersion="d3bj", xc="pbe"`` adds Grimme's D3(BJ)
        energy, forces and stress (:mod:`mlpot.calculators.dispersion`; needs the ``d3`` extra).
    min_distance: atoms closer than this (Å) are an error (two atoms on one site make every
        model output meaningless); 0 switches the check off.
    head: the head of a multi-head model to use (None: mace-torch's default, the only head or
        the one named ``default``); an unknown name is a :class:`ConfigError`.

    Non-finite positions or cell are an error (a NaN never passes the skin test silently), and
    so are a non-finite energy, forces or stress from the model: a relaxation or MD run stops
    at the first one instead of carrying NaN on.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "stresses"]

    def __init__(self, model=None, device="auto", dtype=None, compile=False, skin=0.0, min_distance=0.1,
                 models=None, dispersion=None, xc=None, dispersion_cutoff=None, head=None,
                 **kwargs):
        # committee (models=[...]) and D3 dispersion (dispersion="d3bj", xc=...): see
        # mlpot.calculators.committee and mlpot.calculators.dispersion
        if models is not None:
            if model is not None:
                raise ConfigError("MLPotCalculator: give either model or models=[...], not both")
            models = list(models)
            model = models[0] if models else None
        if model is None:
            raise ConfigError("MLPotCalculator: no model given (model=PATH or models=[PATH, ...])")
        if compile:
            raise ConfigError(
                "MLPotCalculator(compile=True): torch.compile of mlpot models is not supported "
                "(dynamo fails on e3nn Irreps); leave compile=False"
            )
        super().__init__(**kwargs)
        self.device = resolve_device(device)
        self.model = _load(model, self.device, resolve_dtype(dtype))
        p = next(self.model.parameters(), None)
        self.dtype = p.dtype if p is not None else (resolve_dtype(dtype) or torch.float64)
        self.r_max = float(self.model.r_max)
        self.skin = float(skin)
        if not self.skin >= 0 or not np.isfinite(self.skin):
            raise ConfigError(f"skin must be finite and >= 0, got {skin}")
        self.min_distance = float(min_distance)
        if not self.min_distance >= 0 or not np.isfinite(self.min_distance):
            raise ConfigError(f"min_distance must be finite and >= 0, got {min_distance}")
        self._nl = None  # cached neighbour list state
        self.head = head if head is not None else self.model.active_head
        self.head_index = self.model.head_index(head)  # validates the name
        self.nl_builds = 0  # number of neighbour-list builds (for tests / diagnostics)
        self.committee = None
        if models is not None:
            from mlpot.calculators.committee import check_committee

            self.committee = [self.model] + [_load(m, self.device, resolve_dtype(dtype) or self.dtype)
                                             for m in models[1:]]
            check_committee(self.committee)
        self.dispersion = None
        if dispersion is not None or xc is not None:
            from mlpot.calculators.dispersion import D3Dispersion

            self.dispersion = D3Dispersion(dispersion, xc, dispersion_cutoff)

    # ---- neighbour list -------------------------------------------------------------------
    def _check_species(self, numbers: np.ndarray) -> None:
        known = set(self.model.atomic_numbers)
        bad = sorted({int(z) for z in numbers} - known)
        if bad:
            from ase.data import chemical_symbols

            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in bad)
            trained = ", ".join(chemical_symbols[z] for z in self.model.atomic_numbers)
            raise UnknownElementError(f"element(s) {names} not known to this model (trained on {trained})")

    def _needs_rebuild(self, atoms) -> bool:
        nl = self._nl
        if nl is None or self.skin <= 0:
            return True
        if len(atoms) != len(nl["numbers"]) or not np.array_equal(atoms.numbers, nl["numbers"]):
            return True
        if not np.array_equal(atoms.pbc, nl["pbc"]) or not np.array_equal(atoms.cell.array, nl["cell"]):
            return True
        disp = atoms.positions - nl["positions"]
        return float(np.max(np.einsum("ij,ij->i", disp, disp), initial=0.0)) > (0.5 * self.skin) ** 2

    def _neighbors(self, atoms):
        """(i, j, S) with |D| < r_max for the current positions (reusing the list when allowed)."""
        from mlpot.data.neighbors import neighbor_list

        cell = atoms.cell.array
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if self._needs_rebuild(atoms):
            i, j, S = neighbor_list(
                atoms.positions, self.r_max + self.skin, cell=cell if pbc.any() else None, pbc=pbc
            )
            # edges grouped by receiver (stable): the message passing reads them in that order
            # (mlpot.o3.grouped_message_passing; with equal in-degrees it needs no gather at all)
            i, j, S = i.numpy(), j.numpy(), S.numpy()
            order = np.argsort(j, kind="stable")
            self._nl = {
                "i": i[order], "j": j[order], "S": S[order],
                "positions": atoms.positions.copy(), "numbers": atoms.numbers.copy(),
                "cell": cell.copy(), "pbc": pbc.copy(),
            }
            self.nl_builds += 1
            if self.skin <= 0:
                i, j, S = self._nl["i"], self._nl["j"], self._nl["S"]
                if self.min_distance > 0 and len(i):
                    D = atoms.positions[j] - atoms.positions[i] + S @ cell
                    self._check_min_distance(i, j, np.einsum("ij,ij->i", D, D))
                return i, j, S
        nl = self._nl
        i, j, S = nl["i"], nl["j"], nl["S"]
        pos = atoms.positions
        D = pos[j] - pos[i] + S @ cell
        d2 = np.einsum("ij,ij->i", D, D)
        self._check_min_distance(i, j, d2)
        keep = d2 < self.r_max**2
        return i[keep], j[keep], S[keep]

    @staticmethod
    def _evaluate(model, graph: dict, atomic: bool, compute_stress: bool) -> dict:
        """One model's results for ``graph`` (numpy, float64, ASE's units and Voigt order)."""
        if atomic:
            out = model(dict(graph), compute_force=True, compute_stress=True, compute_atomic_stress=True)
        else:
            out = model(dict(graph), compute_force=True, compute_stress=compute_stress)
        energy = float(out["energy"].detach().sum().cpu())
        res = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["node_energy"].detach().cpu().double().numpy(),
            "forces": out["forces"].detach().cpu().double().numpy(),
        }
        if compute_stress:
            res["stress"] = full_3x3_to_voigt(out["stress"].detach()[0].cpu().double().numpy())
        if atomic:
            res["stresses"] = full_3x3_to_voigt(out["atomic_stress"].detach().cpu().double().numpy())
        return res

    def _check_min_distance(self, i, j, d2) -> None:
        if self.min_distance <= 0 or len(d2) == 0:
            return
        k = int(np.argmin(d2))
        if d2[k] < self.min_distance**2:
            a, b = sorted((int(i[k]), int(j[k])))  # the same words whatever the edge order
            raise DataError(
                f"atoms {a} and {b} are {np.sqrt(d2[k]):.3g} Å apart (closer than "
                f"min_distance {self.min_distance} Å)"
            )

    @staticmethod
    def _check_finite_structure(atoms) -> None:
        pos = atoms.positions
        if not np.all(np.isfinite(pos)):
            bad = np.nonzero(~np.isfinite(pos).all(1))[0][:5].tolist()
            raise DataError(f"non-finite (NaN/inf) positions at atom(s) {bad}")
        if np.asarray(atoms.pbc).any() and not np.all(np.isfinite(atoms.cell.array)):
            raise DataError(f"non-finite (NaN/inf) cell {atoms.cell.array.tolist()}")

    def build_graph(self, atoms) -> dict:
        """The graph dict of ``atoms`` (one structure) on the calculator's device and dtype."""
        numbers = np.asarray(atoms.numbers)
        self._check_species(numbers)
        self._check_finite_structure(atoms)  # before the skin test: NaN > x is False
        i, j, S = self._neighbors(atoms)
        graph = graph_from_neighbor_list(
            atoms.positions.copy(), numbers, atoms.cell.array, atoms.pbc, i, j, S,
            dtype=self.dtype, device=self.device,
        )
        graph["head"] = torch.tensor([self.head_index], dtype=torch.long, device=self.device)
        return graph

    # ---- ASE interface --------------------------------------------------------------------
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        periodic = bool(np.all(atoms.pbc))
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        compute_stress = periodic
        # per-atom stresses (calc.get_stresses(), (N, 6), summing to the stress; for heat transport)
        atomic = "stresses" in properties
        if atomic and not periodic:
            raise PropertyNotImplementedError("per-atom stresses need a cell periodic in all three directions")
        graph = self.build_graph(atoms)
        with _call_threads(self.device):
            members = [self._evaluate(model, graph, atomic, compute_stress) for model in self.committee or [self.model]]
        if self.committee is not None:
            from mlpot.calculators.committee import committee_mean_and_spread

            self.results = committee_mean_and_spread(members)
        else:
            self.results = members[0]
        if self.dispersion is not None:
            self.dispersion.add_to(self.results, atoms, compute_stress)
        for key in ("energy", "forces", "stress", "stresses"):
            if key in self.results and not np.all(np.isfinite(self.results[key])):
                self.results = {}
                raise NonFiniteError(
                    f"the model gave a non-finite {key} for {atoms.get_chemical_formula()} "
                    f"({len(atoms)} atoms); stopping"
                )

    def get_descriptors(self, atoms=None) -> np.ndarray:
        """Invariant per-atom features (N, F): the model's ``node_features`` output."""
        atoms = self.atoms if atoms is None else atoms
        if atoms is None:
            raise ValueError("get_descriptors needs an Atoms object")
        graph = self.build_graph(atoms)
        with torch.no_grad():
            out = self.model(graph, compute_force=False, compute_stress=False)
        if "node_features" not in out:
            raise PropertyNotImplementedError(
                f"model {type(self.model).__name__} does not return node_features (descriptors)"
            )
        return out["node_features"].detach().cpu().double().numpy()

    # ---- Hessian (mlpot.models.hessian, mlpot.models.hip) ------------------------------------
    def get_hessian(self, atoms=None, method: str = "autograd") -> np.ndarray:
        """The ``(3N, 3N)`` Hessian :math:`\\partial^2 E / \\partial r_{i\\alpha} \\partial r_{j\\beta}`
        in eV/Å² (row ``3 i + alpha``, ASE's layout), float64 numpy.

        method: ``"autograd"`` (second derivative of the model's energy) or ``"direct"`` (the
        model's HIP head; a model without one is a ConfigError). A non-finite Hessian is an error.
        """
        from mlpot.models.hessian import check_hessian_method

        atoms = self.atoms if atoms is None else atoms
        if atoms is None:
            raise ValueError("get_hessian needs an Atoms object")
        check_hessian_method(self.model, method)
        graph = self.build_graph(atoms)
        out = self.model(graph, compute_force=method == "autograd", compute_stress=False, create_graph=False,
                         compute_hessian=True, hessian_method=method)
        hessian = out["hessian"].detach().cpu().double().numpy()
        if not np.all(np.isfinite(hessian)):
            raise NonFiniteError(
                f"the model gave a non-finite Hessian for {atoms.get_chemical_formula()} ({len(atoms)} atoms)"
            )
        return hessian
