"""From a validated config to data splits, dataset statistics and a model.

* :func:`prepare_data` reads the files of ``data`` (or writes the built-in EMT set of
  ``data.synthetic``), holds out a validation fraction when asked, and applies
  ``training.config_type_weights``.
* :func:`resolve_model_config` fills in what ``"auto"`` and ``"average"`` leave open —
  species, E0s, ``avg_num_neighbors``, ``scale``, ``shift`` — from the training set, using
  :mod:`mlpot.data.statistics`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlpot.errors import ConfigError, DataError

__all__ = ["Splits", "prepare_data", "resolve_model_config", "read_frames"]


@dataclass
class Splits:
    train: list
    valid: list
    tests: dict = field(default_factory=dict)  # name -> list[Atoms]
    isolated: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    # lazy (HDF5) training only: streamed statistics and whether any frame has a stress
    moments: object = None
    has_stress: bool | None = None


def read_frames(path, data_cfg: dict, require=()) -> list:
    from mlpot.data import read
    from mlpot.data.readers import MIN_DISTANCE

    keys, units = data_cfg.get("keys", {}) or {}, data_cfg.get("units", {}) or {}
    frames = read(
        path,
        data_cfg.get("format"),
        energy_key=keys.get("energy"),
        forces_key=keys.get("forces"),
        stress_key=keys.get("stress"),
        virials_key=keys.get("virials"),
        config_type_key=keys.get("config_type") or "config_type",
        energy_unit=units.get("energy"),
        length_unit=units.get("length"),
        stress_unit=units.get("stress"),
        require=require,
        min_distance=data_cfg.get("min_distance", MIN_DISTANCE),
    )
    for k, atoms in enumerate(frames):  # provenance, for error messages (file, frame)
        atoms.info["_mlpot_source"] = (str(path), k)
    return frames


def synthetic_paths(cfg: dict) -> dict:
    from mlpot.data.synthetic import generate_emt_dataset

    syn = cfg["data"]["synthetic"]
    out_dir = syn["cache_dir"] or str(Path(cfg["output"]) / "data")
    return generate_emt_dataset(
        out_dir, n_train=syn["n_train"], n_valid=syn["n_valid"], n_test=syn["n_test"],
        seed=syn["seed"], system=syn["system"], hessian=syn["hessian"],
    )


def _is_isolated(atoms) -> bool:
    from mlpot.data.statistics import is_isolated_atom

    return is_isolated_atom(atoms.numbers, atoms.info.get("config_type"), atoms.pbc)


def data_sources(cfg: dict, generate: bool = True) -> tuple[list, object, dict, dict]:
    """The training files, the validation spec (a file or a fraction), the named test files of
    the config, and the synthetic set's files (generated when missing) when it names one."""
    data = cfg["data"]
    files: dict = {}
    if data["synthetic"] is not None:
        paths = synthetic_paths(cfg) if generate else None
        if paths is None:
            raise ConfigError("synthetic data not generated")
        files = {k: str(v) for k, v in paths.items()}
        train_files = [files["train"]]
        valid_spec = files["valid"] if data["synthetic"]["n_valid"] > 0 else 0.0
        test_spec = {"test": files["test"]} if data["synthetic"]["n_test"] > 0 else {}
    else:
        train_files = data["train"] if isinstance(data["train"], list) else [data["train"]]
        valid_spec = data["valid"]
        t = data["test"]
        if t is None:
            test_spec = {}
        elif isinstance(t, str):
            test_spec = {"test": t}
        elif isinstance(t, list):
            test_spec = {}
            for p in t:
                name = Path(p).stem
                if name in test_spec or name in ("train", "valid"):
                    name = f"{name}_{len(test_spec)}"
                test_spec[name] = p
        else:
            test_spec = dict(t)
    return train_files, valid_spec, test_spec, files


def prepare_data(cfg: dict, generate: bool = True) -> Splits:
    """Read (or generate) the train / valid / test sets named by the config, in memory (HDF5
    datasets that stay on disk: :func:`mlpot.train.lazy_data.prepare_lazy_data`)."""
    data = cfg["data"]
    train_files, valid_spec, test_spec, files = data_sources(cfg, generate)
    train = []
    for p in train_files:
        train.extend(read_frames(p, data))
    isolated = [a for a in train if _is_isolated(a)]
    train = [a for a in train if not _is_isolated(a)]
    if data["isolated_atoms"] is not None:
        isolated = read_frames(data["isolated_atoms"], data, require=("energy",))
    if data["max_train"] is not None:
        train = train[: data["max_train"]]
    if not train:
        raise DataError(f"no training structures in {', '.join(map(str, train_files))}")

    if isinstance(valid_spec, str):
        valid = [a for a in read_frames(valid_spec, data) if not _is_isolated(a)]
    else:
        keep, held = split_fraction(len(train), valid_spec, cfg["seed"])
        valid = [train[k] for k in held]
        train = [train[k] for k in keep]
    tests = {name: read_frames(p, data) for name, p in test_spec.items()}

    weights = cfg["training"]["config_type_weights"]
    if weights:
        for atoms in train + valid:
            ct = atoms.info.get("config_type", "Default")
            if ct in weights:
                atoms.info["weight"] = float(atoms.info.get("weight", 1.0)) * float(weights[ct])
    files.update({"train": train_files, "valid": valid_spec, "test": test_spec})
    return Splits(train=train, valid=valid, tests=tests, isolated=isolated, files=files)


def split_fraction(n: int, valid_spec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) positions, each sorted, for holding out the fraction ``valid_spec`` of
    ``n`` frames by a permutation seeded with ``seed`` (at least one frame when > 0)."""
    frac = float(valid_spec or 0.0)
    n_valid = int(round(frac * n))
    if frac > 0:
        n_valid = max(1, n_valid)
    if n_valid >= n:
        raise ConfigError(f"data.valid={frac} leaves no training structures ({n} in total)")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def _e0_dict(e0s) -> dict[int, float]:
    from ase.data import atomic_numbers as symbol_to_z

    out = {}
    for k, v in e0s.items():
        z = int(k) if str(k).lstrip("-").isdigit() else symbol_to_z.get(str(k))
        if z is None:
            raise ConfigError(f"config key `model.e0s`: unknown element {k!r}")
        out[z] = float(v)
    return out


def resolve_model_config(cfg: dict, splits: Splits) -> tuple[str, dict, dict]:
    """``(name, kwargs for build_model, statistics dict)`` with every "auto" value filled in."""
    from mlpot.data.statistics import compute_statistics, e0s_from_isolated_atoms
    from mlpot.models.base import get_model_class

    m = dict(cfg["model"])
    m.pop("init_from", None)  # fine-tuning goes through mlpot.train.finetune instead
    name = m.pop("name")
    r_max = float(m["r_max"])
    lazy = splits.moments is not None
    species = splits.moments.species() if lazy else sorted({int(z) for a in splits.train for z in a.numbers})
    if m.get("atomic_numbers"):
        given = [int(z) for z in m["atomic_numbers"]]
        missing = sorted(set(species) - set(given))
        if missing:
            raise ConfigError(f"config key `model.atomic_numbers`: training data has elements {missing} not listed")
        species = given
    e0s = m["e0s"]
    if isinstance(e0s, dict):
        e0_table = _e0_dict(e0s)
    elif isinstance(e0s, list):
        if len(e0s) != len(species):
            raise ConfigError(f"config key `model.e0s`: {len(e0s)} values for {len(species)} species {species}")
        e0_table = {z: float(v) for z, v in zip(species, e0s)}
    elif e0s == "isolated":
        if not splits.isolated:
            raise ConfigError(
                "config key `model.e0s` is 'isolated' but there are no isolated-atom frames "
                "(config_type IsolatedAtom in the training file, or `data.isolated_atoms`)"
            )
        e0_table = e0s_from_isolated_atoms(splits.isolated)
    else:
        e0_table = None  # least squares below
    if lazy:
        has_energy = splits.moments.n_energy > 0
    else:
        has_energy = any("energy" in (a.calc.results if a.calc is not None else {}) for a in splits.train)
    if e0_table is None and not has_energy:
        e0_table = {z: 0.0 for z in species}
    if lazy:
        from mlpot.data.streaming_stats import finalize_statistics

        stats = finalize_statistics(splits.moments, e0s=e0_table if e0_table is not None else "fit",
                                    species=species)
    else:
        stats = compute_statistics(splits.train, r_max, e0s=e0_table if e0_table is not None else "fit",
                                   species=species)
    e0_table = {int(z): float(v) for z, v in stats.e0s.items()}
    missing = [z for z in species if z not in e0_table]
    if missing:
        raise ConfigError(f"config key `model.e0s`: no E0 for atomic numbers {missing}")

    kwargs = {k: v for k, v in m.items() if k not in ("e0s",)}
    kwargs["r_max"] = r_max
    kwargs["atomic_numbers"] = species
    kwargs["e0s"] = {str(z): e0_table[z] for z in species}
    if kwargs["avg_num_neighbors"] == "auto":
        kwargs["avg_num_neighbors"] = float(stats.avg_num_neighbors) or 1.0
    if kwargs["scale"] == "auto":
        scale = stats.forces_rms if stats.forces_rms > 0 else stats.std_interaction_energy
        kwargs["scale"] = float(scale) if scale > 0 else 1.0
    if kwargs["shift"] == "auto":
        kwargs["shift"] = float(stats.mean_interaction_energy)
    kwargs["dtype"] = cfg["dtype"]

    cls = get_model_class(name)
    params = inspect.signature(cls.__init__).parameters
    # mace-torch's names for the energy scale and shift
    for ours, theirs in (("scale", "atomic_inter_scale"), ("shift", "atomic_inter_shift")):
        if ours not in params and theirs in params and ours in kwargs:
            kwargs[theirs] = kwargs.pop(ours)
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        dropped = [k for k in kwargs if k not in params]
        for k in dropped:
            if cfg["model"].get(k) not in (None, "auto") and k in cfg["model"] and k not in (
                "avg_num_neighbors", "scale", "shift"
            ):
                raise ConfigError(f"config key `model.{k}`: model {name} does not take it")
            kwargs.pop(k)
    statistics = stats.to_dict()
    check_elements(splits, species)
    return name, kwargs, statistics


def check_elements(splits: Splits, species) -> None:
    """Every validation and test frame has only elements the model will know (before training,
    so that a bad test file does not fail a finished run)."""
    from ase.data import chemical_symbols

    known = set(int(z) for z in species)
    sets = {"valid": splits.valid, **{f"test set {n!r}": v for n, v in splits.tests.items()}}
    for name, frames in sets.items():
        if not isinstance(frames, list):
            continue  # lazy HDF5 sets: checked from their streamed species (mlpot.train.lazy_data)
        for k, atoms in enumerate(frames):
            bad = sorted({int(z) for z in atoms.numbers} - known)
            if bad:
                src = atoms.info.get("_mlpot_source")
                where = f"{src[0]}: frame {src[1]}" if src else f"{name} frame {k}"
                names = ", ".join(chemical_symbols[z] for z in bad)
                raise DataError(
                    f"{where} ({name}): element(s) {names} do not occur in the training data "
                    f"(elements {', '.join(chemical_symbols[z] for z in sorted(known))}); "
                    "add them to `model.atomic_numbers` or remove the frame"
                )
