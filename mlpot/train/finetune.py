r"""Fine-tuning: start from a trained model, grow it to new elements, freeze parts of it.

Config keys (see :mod:`mlpot.train.config`)::

    model:
      init_from: PATH        # an mlpot model file (also what `mlpot import-mace` writes),
                             # or a mace-torch export folder (scripts/export_mace.py output)
      e0s: {Ni: -0.3}        # optional: E0s of elements the pretrained model lacks
    training:
      freeze: [node_embedding, interactions.0]   # module prefixes whose weights stay fixed

**Architecture.** With ``model.init_from`` the architecture, cutoff, ``avg_num_neighbors``,
scale and shift come from the file; giving any other architecture key beside it is an error
(the config cannot describe a model the weights do not fit).

**New elements.** Elements of the training data that the pretrained model lacks are appended
to its species list, so the one-hot index of every old element is unchanged. Every
species-indexed weight grows along its species axis: the old rows are kept, a new element's
rows start as the mean of the old rows (the new element starts as the "average" known
element). e3nn's path normalisation of a linear map or tensor product out of the one-hot
``S x 0e`` input scales as :math:`1/\sqrt{S}`; the kept rows are multiplied by
``path_weight_old / path_weight_new`` so that the grown model computes exactly the pretrained
function on structures of old elements. :func:`grow_species` checks that on a probe structure
(float64, relative 1e-9) and fails otherwise.

E0s of new elements: from ``model.e0s`` when it names them, else least squares over the
training energies with the pretrained E0s of the old elements held fixed,
:math:`\min_{e} \sum_c (E_c - \sum_{z\,\mathrm{old}} n_{cz} E_0(z) - \sum_{z\,\mathrm{new}} n_{cz} e_z)^2`.

**Freezing.** ``training.freeze`` lists dotted module prefixes of ``model.named_parameters()``
(``interactions.0`` freezes ``interactions.0.*``); a prefix that matches no parameter is a
:class:`~mlpot.errors.ConfigError` naming it and the model's top-level modules.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlpot.errors import ConfigError, DataError, ModelFileError

__all__ = [
    "FinetuneModel",
    "load_pretrained",
    "grow_species",
    "fit_new_e0s",
    "apply_freeze",
    "prepare_finetune",
    "add_head",
    "ReplaySet",
    "make_replay",
]


@dataclass
class FinetuneModel:
    """What :func:`prepare_finetune` hands the trainer."""

    name: str
    kwargs: dict
    statistics: dict
    model: torch.nn.Module
    new_species: list


def load_pretrained(path) -> torch.nn.Module:
    """The model of ``model.init_from``: an mlpot model file, or a mace-torch export folder
    (``hyperparameters.json`` + ``weights.safetensors``), imported with parity."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config key `model.init_from`: file not found: {path}")
    try:
        if p.is_dir():
            from mlpot.models.mace_import import import_mace

            return import_mace(p).to(torch.float64)
        from mlpot.models.io import load_model

        return load_model(p, device="cpu", dtype="float64")
    except (ModelFileError, FileNotFoundError) as exc:
        raise ConfigError(f"config key `model.init_from`: {exc}") from None


# ---- growing the species list ---------------------------------------------------------------
def _grow_rows(old: torch.Tensor, new: torch.Tensor, axis: int, factor: float = 1.0) -> torch.Tensor:
    """``new``'s shape; the first ``old.shape[axis]`` slices along ``axis`` are ``old * factor``,
    the rest the mean of those."""
    n_old = old.shape[axis]
    kept = old * factor
    mean = kept.mean(dim=axis, keepdim=True)
    extra = new.shape[axis] - n_old
    reps = [1] * old.dim()
    reps[axis] = extra
    return torch.cat([kept, mean.repeat(*reps)], dim=axis).to(new.dtype)


def _grow_flat(old_w: torch.Tensor, new_w: torch.Tensor, old_ins, new_ins, what: str) -> torch.Tensor:
    """Grow a flat e3nn weight (``o3.Linear`` / ``o3.TensorProduct``): per instruction, reshape
    to its ``path_shape``, find the one axis whose size changed (the species axis) and grow it,
    compensating the path normalisation (``path_weight``)."""
    old_ins = [i for i in old_ins if getattr(i, "has_weight", True)]
    new_ins = [i for i in new_ins if getattr(i, "has_weight", True)]
    out, a, b = [], 0, 0
    if len(old_ins) != len(new_ins):
        raise ModelFileError(f"{what}: instruction lists differ after growing the species")
    for io, inew in zip(old_ins, new_ins):
        so, sn = tuple(io.path_shape), tuple(inew.path_shape)
        no, nn_ = int(np.prod(so)), int(np.prod(sn))
        blk_old = old_w[a : a + no].reshape(so)
        a, b = a + no, b + nn_
        if so == sn:
            out.append(blk_old.reshape(-1).to(new_w.dtype))
            continue
        axes = [k for k, (x, y) in enumerate(zip(so, sn)) if x != y]
        if len(so) != len(sn) or len(axes) != 1:
            raise ModelFileError(f"{what}: cannot grow path shape {so} to {sn}")
        factor = float(io.path_weight) / float(inew.path_weight)
        out.append(_grow_rows(blk_old, torch.zeros(sn, dtype=new_w.dtype), axes[0], factor).reshape(-1))
    if a != old_w.numel() or b != new_w.numel():
        raise ModelFileError(f"{what}: weights do not match its instructions")
    return torch.cat(out) if out else new_w.clone()


def _instructions(module):
    return getattr(module, "instructions", None)


def grow_species(model, new_numbers, new_e0s: dict) -> torch.nn.Module:
    """A copy of ``model`` that also knows ``new_numbers`` (appended to its species list), with
    E0s ``new_e0s[z]`` for them; on the old elements it computes exactly ``model``'s function."""
    from mlpot.models.registry import get_model_class

    new_numbers = [int(z) for z in new_numbers]
    if not new_numbers:
        return model
    old_z = list(model.atomic_numbers)
    config = copy.deepcopy(model.config)
    config["atomic_numbers"] = old_z + new_numbers
    heads = list(getattr(model, "heads", ["Default"]))
    e0_rows = model.atomic_energies.detach().to(torch.float64).reshape(len(heads), -1).tolist()
    tables = []
    for row in e0_rows:  # per head: the old E0s, then the new elements' (the same for every head)
        t = {str(z): float(v) for z, v in zip(old_z, row)}
        t.update({str(z): float(new_e0s[z]) for z in new_numbers})
        tables.append(t)
    config["e0s"] = tables[0] if len(heads) == 1 else dict(zip(heads, tables))
    if config.get("product_basis_sizes") is not None:
        config["product_basis_sizes"] = copy.deepcopy(model.config["product_basis_sizes"])
    cls = get_model_class(model.model_name)
    grown = cls(**config).to(torch.float64)
    old_state = model.state_dict()
    old_modules = dict(model.named_modules())
    new_state = grown.state_dict()
    S_old, S_new = len(old_z), len(old_z) + len(new_numbers)
    for name, new_t in new_state.items():
        if name not in old_state:
            raise ModelFileError(f"growing the species: pretrained model lacks {name}")
        old_t = old_state[name]
        if name == "atomic_energies" or name.endswith("output_mask"):  # from the config / the irreps
            continue
        if old_t.shape == new_t.shape:
            new_state[name] = old_t.clone().to(new_t.dtype)
            continue
        owner, _, leaf = name.rpartition(".")
        ins_old = _instructions(old_modules.get(owner))
        ins_new = _instructions(dict(grown.named_modules()).get(owner))
        if leaf == "weight" and ins_old is not None and old_t.dim() == 1:
            new_state[name] = _grow_flat(old_t, new_t, ins_old, ins_new, name)
        elif old_t.dim() >= 1 and old_t.shape[0] == S_old and new_t.shape[0] == S_new \
                and old_t.shape[1:] == new_t.shape[1:]:
            new_state[name] = _grow_rows(old_t, new_t, 0)  # per-element weights (symmetric contraction)
        else:
            raise ModelFileError(
                f"growing the species: do not know how to grow {name} from {tuple(old_t.shape)} to "
                f"{tuple(new_t.shape)}"
            )
    grown.load_state_dict(new_state)
    grown.metadata = dict(getattr(model, "metadata", {}) or {})
    _check_same_function(model, grown)
    return grown


def _probe_structure(numbers):
    """A small cluster of the given elements (deterministic), within any cutoff >= 2 Å."""
    from ase import Atoms

    rng = np.random.default_rng(0)
    zs = [numbers[k % len(numbers)] for k in range(max(4, len(numbers)))]
    pos = np.array([[0.0, 0.0, 0.0], [1.6, 0.2, 0.1], [0.3, 1.7, -0.2], [0.1, 0.4, 1.5]])
    extra = len(zs) - len(pos)
    if extra > 0:
        pos = np.vstack([pos, rng.uniform(-1.8, 1.8, size=(extra, 3)) + 2.5])
    return Atoms(numbers=zs, positions=pos[: len(zs)])


def _check_same_function(old, grown, head_old=None, head_new=None) -> None:
    """``grown`` (head ``head_new``) computes ``old``'s function (head ``head_old``) on a probe
    structure of ``old``'s elements; every head when none is named."""
    if head_old is None and len(getattr(old, "heads", [None])) > 1:
        for h in old.heads:
            _check_same_function(old, grown, h, h)
        return
    atoms = _probe_structure(list(old.atomic_numbers))
    a = old.predict([atoms], **({"head": head_old} if head_old is not None else {}))
    b = grown.predict([atoms], **({"head": head_new} if head_new is not None else {}))
    e_ref = abs(float(a["energy"][0])) + 1.0
    de = abs(float(a["energy"][0] - b["energy"][0]))
    df = float(np.abs(a["forces"][0] - b["forces"][0]).max())
    f_ref = float(np.abs(a["forces"][0]).max()) + 1.0
    if de > 1e-9 * e_ref or df > 1e-9 * f_ref:
        raise ModelFileError(
            f"fine-tuning setup changed the pretrained function (|dE| {de:.3g} eV, max |dF| {df:.3g} eV/Å)"
        )


def fit_new_e0s(frames, old_e0s: dict, new_species) -> dict:
    """Least-squares E0s of ``new_species`` with the old elements' E0s held fixed (module docstring)."""
    new_species = [int(z) for z in new_species]
    index = {z: k for k, z in enumerate(new_species)}
    rows, target = [], []
    for atoms in frames:
        calc = atoms.calc
        if calc is None or "energy" not in calc.results:
            continue
        counts = np.zeros(len(new_species))
        fixed = 0.0
        for z in atoms.numbers:
            z = int(z)
            if z in index:
                counts[index[z]] += 1
            else:
                fixed += old_e0s[z]
        if counts.any():
            rows.append(counts)
            target.append(float(calc.results["energy"]) - fixed)
    if not rows:
        from ase.data import chemical_symbols

        names = ", ".join(chemical_symbols[z] for z in new_species)
        raise DataError(
            f"new element(s) {names}: no training frame with an energy contains them, so their E0s cannot be "
            "fitted; give them in `model.e0s`"
        )
    sol, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(target), rcond=None)
    return {z: float(sol[index[z]]) for z in new_species}


# ---- freezing -------------------------------------------------------------------------------
def apply_freeze(model, prefixes) -> int:
    """Set ``requires_grad=False`` on every parameter under one of the dotted ``prefixes``;
    returns the number of frozen scalars. An unknown prefix is a ConfigError naming it."""
    names = [n for n, _ in model.named_parameters()]
    frozen = 0
    for k, prefix in enumerate(prefixes or []):
        if not isinstance(prefix, str) or not prefix.strip():
            raise ConfigError(f"config key `training.freeze[{k}]`: expected a module prefix, got {prefix!r}")
        prefix = prefix.strip().rstrip(".")
        hit = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hit:
            top = sorted({n.split(".")[0] for n in names})
            raise ConfigError(
                f"config key `training.freeze[{k}]`: {prefix!r} matches no parameter of the model "
                f"(its modules: {', '.join(top)})"
            )
    params = dict(model.named_parameters())
    for prefix in prefixes or []:
        prefix = prefix.strip().rstrip(".")
        for n, p in params.items():
            if (n == prefix or n.startswith(prefix + ".")) and p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    if prefixes and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("config key `training.freeze`: every parameter of the model is frozen; nothing to train")
    return frozen


# ---- the trainer's entry point --------------------------------------------------------------
def prepare_finetune(cfg: dict, splits, log=print) -> FinetuneModel:
    """Load ``model.init_from``, grow it to the elements of the training data, and return it
    with the config that rebuilds it (``kwargs``) and the training-set statistics."""
    from ase.data import chemical_symbols

    from mlpot.data.statistics import compute_statistics
    from mlpot.train.setup import _e0_dict, check_elements

    m = cfg["model"]
    path = m["init_from"]
    model = load_pretrained(path)
    old_z = list(model.atomic_numbers)
    present = sorted({int(z) for a in splits.train for z in a.numbers})
    new_z = [z for z in present if z not in old_z]
    given = _e0_dict(m["e0s"]) if isinstance(m["e0s"], dict) else {}
    if isinstance(m["e0s"], list):
        raise ConfigError("config key `model.e0s`: with model.init_from give E0s as {element: eV}")
    if m["e0s"] == "isolated":
        from mlpot.data.statistics import e0s_from_isolated_atoms

        if not splits.isolated:
            raise ConfigError("config key `model.e0s` is 'isolated' but there are no isolated-atom frames")
        given = e0s_from_isolated_atoms(splits.isolated)
    e0_new = {z: given[z] for z in new_z if z in given}
    still = [z for z in new_z if z not in e0_new]
    if still:
        e0_new.update(fit_new_e0s(splits.train, model.e0s, still))
    if new_z:
        model = grow_species(model, new_z, e0_new)
        log("fine-tuning: new element(s) "
            + ", ".join(f"{chemical_symbols[z]} (E0 {e0_new[z]:.6g} eV)" for z in new_z)
            + "; embeddings grown, old rows kept")
    ft = cfg.get("finetune") or {}
    if ft.get("head") is not None:
        model = add_head(model, ft["head"], ft.get("pretrained_head"))
        model.select_head(ft["head"])  # batches without a `head` entry (the user's data) train the new head
        log(f"fine-tuning: heads {', '.join(model.heads)}; new head {ft['head']!r} starts as a copy of "
            f"{ft.get('pretrained_head') or [h for h in model.heads if h != ft['head']][0]!r}")
    changed = {z: v for z, v in given.items() if z in old_z}
    if changed:  # E0s given for known elements: the head that is trained
        e0 = model.atomic_energies.clone()
        row = e0 if e0.dim() == 1 else e0[model.heads.index(model.active_head)]
        for z, v in changed.items():
            row[model.atomic_numbers.index(z)] = v
        model.atomic_energies.copy_(e0)
    species = list(model.atomic_numbers)
    check_elements(splits, species)
    stats = compute_statistics(splits.train, model.r_max, e0s=model.e0s, species=species).to_dict()
    kwargs = copy.deepcopy(model.config)
    if len(getattr(model, "heads", [None])) == 1:  # (a multi-head model keeps its per-head tables)
        kwargs["e0s"] = {str(z): float(v) for z, v in model.e0s.items()}
    kwargs["dtype"] = cfg["dtype"]
    log(f"fine-tuning from {path}: {model.model_name}, species "
        f"{', '.join(chemical_symbols[z] for z in old_z)} -> {', '.join(chemical_symbols[z] for z in species)}")
    return FinetuneModel(model.model_name, kwargs, stats, model, new_z)


def make_replay(cfg: dict, model, dtype, log=print) -> ReplaySet | None:
    """The replay set of ``finetune.replay`` for the pretrained head (None without a new head;
    config validation already made `finetune.head` and `finetune.replay` come together)."""
    ft = cfg["finetune"]
    if ft["head"] is None:
        return None
    pretrained = [h for h in model.heads if h != ft["head"]]
    head = ft["pretrained_head"] or (PRETRAINED_HEAD if PRETRAINED_HEAD in pretrained else pretrained[0])
    if head not in pretrained:
        raise ConfigError(f"config key `finetune.pretrained_head`: {head!r} is not a pretrained head "
                          f"({', '.join(pretrained)})")
    bs = ft["replay_batch_size"] or cfg["training"]["batch_size"]
    replay = ReplaySet(ft["replay"], cfg["data"], model, head, ft["replay_weight"], bs, dtype, cfg["seed"])
    log(f"replay: ON, {len(replay)} frames from {ft['replay']} keep head {head!r} "
        f"(weight {ft['replay_weight']}, {min(bs, len(replay))} frames per step); new head {ft['head']!r} "
        "is trained on `data`")
    return replay


# ---- multi-head replay fine-tuning ----------------------------------------------------------
#: mace-torch's name for the pretrained head after multi-head fine-tuning
PRETRAINED_HEAD = "pt_head"


def _block_map(n_old: int, n_new: int, h_old: int, h_new: int, src: int) -> list[int] | None:
    """Index map of an axis holding ``h`` head-major blocks: the old blocks, then block ``src``
    again for every added head; None when the axis is not such an axis."""
    if h_old <= 0 or n_old % h_old or n_new % h_new or n_old // h_old != n_new // h_new:
        return None
    m = n_old // h_old
    return list(range(n_old)) + [src * m + k for _ in range(h_new - h_old) for k in range(m)]


def _add_head_flat(old_w, new_w, old_ins, new_ins, h_old, h_new, src, what) -> torch.Tensor:
    """Grow a flat e3nn weight whose head axes (output channels of a readout) grew from ``h_old``
    to ``h_new`` head-major blocks: the new blocks copy head ``src``'s, all kept entries are
    rescaled by ``path_weight_old / path_weight_new`` (the fan-in of a map out of the heads'
    hidden features grows with the number of heads)."""
    old_ins = [i for i in old_ins if getattr(i, "has_weight", True)]
    new_ins = [i for i in new_ins if getattr(i, "has_weight", True)]
    if len(old_ins) != len(new_ins):
        raise ModelFileError(f"{what}: instruction lists differ after adding a head")
    out, a = [], 0
    for io, inew in zip(old_ins, new_ins):
        so, sn = tuple(io.path_shape), tuple(inew.path_shape)
        n = int(np.prod(so))
        blk = old_w[a : a + n].reshape(so)
        a += n
        if so != sn:
            index = []
            for x, y in zip(so, sn):
                m = list(range(x)) if x == y else _block_map(x, y, h_old, h_new, src)
                if m is None:
                    raise ModelFileError(f"{what}: cannot add a head to path shape {so} -> {sn}")
                index.append(torch.tensor(m))
            blk = blk[torch.meshgrid(*index, indexing="ij")]
        out.append((blk * (float(io.path_weight) / float(inew.path_weight))).reshape(-1).to(new_w.dtype))
    return torch.cat(out)


def add_head(model, name: str, source: str | None = None) -> torch.nn.Module:
    """A copy of ``model`` with one more head ``name``, initialised as a copy of head ``source``
    (its readout weights, E0s, scale and shift). A pretrained single head called ``Default`` is
    renamed ``pt_head`` (mace-torch's convention: the new head is then the default one when it is
    named ``Default``). The old heads compute exactly what they computed before."""
    from mlpot.models.registry import get_model_class

    old_heads = list(model.heads)
    heads = list(old_heads)
    if len(heads) == 1 and heads[0].lower() == "default":
        heads = [PRETRAINED_HEAD]
    source_name = source if source is not None else heads[0] if len(heads) == 1 else model.active_head
    if source_name is None:
        raise ConfigError(f"config key `finetune.pretrained_head`: the model has heads {old_heads} and no default; "
                          "name the head the replay set keeps")
    if source_name not in heads:
        raise ConfigError(f"config key `finetune.pretrained_head`: {source_name!r} is not a head of the model "
                          f"({', '.join(heads)})")
    if name in heads:
        raise ConfigError(f"config key `finetune.head`: {name!r} is already a head of the pretrained model "
                          f"({', '.join(heads)}); choose a new name")
    src = heads.index(source_name)
    if "heads" not in inspect_params(get_model_class(model.model_name)):
        raise ConfigError(f"config key `finetune.head`: model {model.model_name} has no heads")
    H_old, H_new = len(heads), len(heads) + 1
    e0 = model.atomic_energies.detach().to(torch.float64).reshape(H_old, -1)
    scale = model.scale_shift.scale.detach().reshape(-1).expand(H_old).tolist()
    shift = model.scale_shift.shift.detach().reshape(-1).expand(H_old).tolist()
    config = copy.deepcopy(model.config)
    config["heads"] = heads + [name]
    config["e0s"] = {h: [float(v) for v in e0[k if k < H_old else src].tolist()]
                     for k, h in enumerate(config["heads"])}
    config["scale"] = scale + [scale[src]]
    config["shift"] = shift + [shift[src]]
    new = get_model_class(model.model_name)(**config).to(torch.float64)
    old_state, new_state = model.state_dict(), new.state_dict()
    old_mods, new_mods = dict(model.named_modules()), dict(new.named_modules())
    for key, t in new_state.items():
        if key in ("atomic_energies", "scale_shift.scale", "scale_shift.shift") or key.endswith("output_mask"):
            continue  # from the config above; e3nn's output masks follow from the irreps
        o = old_state[key]
        if o.shape == t.shape:
            new_state[key] = o.clone().to(t.dtype)
            continue
        owner, _, leaf = key.rpartition(".")
        ins_o, ins_n = _instructions(old_mods.get(owner)), _instructions(new_mods.get(owner))
        if leaf != "weight" or ins_o is None or o.dim() != 1:
            raise ModelFileError(f"adding a head: do not know how to grow {key} from {tuple(o.shape)} to {tuple(t.shape)}")
        new_state[key] = _add_head_flat(o, t, ins_o, ins_n, H_old, H_new, src, key)
    new.load_state_dict(new_state)
    new.metadata = dict(getattr(model, "metadata", {}) or {})
    for k, h in enumerate(old_heads):  # every old head (under its possibly new name) unchanged
        _check_same_function(model, new, head_old=h, head_new=heads[k])
    _check_same_function(model, new, head_old=old_heads[src], head_new=name)  # the copy starts equal
    return new


def inspect_params(cls) -> list[str]:
    import inspect

    return list(inspect.signature(cls.__init__).parameters)


class ReplaySet:
    """Frames labelled for the pretrained head, mixed into every training step:
    ``loss = loss(new head on a training batch) + weight * loss(pretrained head on a replay batch)``.

    Reading, checking and batching happen here; an empty file, a frame without energy or forces,
    or an element the model does not know is an error naming the file (replay never turns itself
    off)."""

    def __init__(self, path, data_cfg: dict, model, head: str, weight: float, batch_size: int, dtype, seed: int):
        from mlpot.data import AtomicDataset
        from mlpot.train.setup import read_frames

        self.path, self.head, self.weight = str(path), head, float(weight)
        try:
            frames = read_frames(path, data_cfg)
        except DataError as exc:
            raise DataError(f"replay set {path}: {exc}") from None
        if not frames:
            raise DataError(f"replay set {path}: no frames; multi-head fine-tuning needs a non-empty replay set")
        known = set(model.atomic_numbers)
        for k, a in enumerate(frames):
            bad = sorted({int(z) for z in a.numbers} - known)
            if bad:
                from ase.data import chemical_symbols

                raise DataError(f"{path}: frame {k} (replay set) has element(s) "
                                f"{', '.join(chemical_symbols[z] for z in bad)} the model does not know")
            res = a.calc.results if a.calc is not None else {}
            if "energy" not in res and "forces" not in res:
                raise DataError(f"{path}: frame {k} (replay set) has neither an energy nor forces to replay")
        self.frames = frames
        self.head_index = model.heads.index(head)
        self.dataset = AtomicDataset(frames, model.r_max, dtype, precompute=True)
        self.has_stress = any("stress" in self.dataset[k] for k in range(len(self.dataset)))
        self.batch_size = int(batch_size)
        self.generator = torch.Generator().manual_seed(int(seed) + 7919)
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self.frames)

    def next_batch(self, device) -> dict:
        """The next ``batch_size`` frames of a reshuffled cycle through the replay set, as one graph
        read with the pretrained head."""
        from mlpot.data import collate
        from mlpot.train.metrics import _to_device

        idx = []
        while len(idx) < min(self.batch_size, len(self.frames)):
            if not self._order:
                self._order = torch.randperm(len(self.frames), generator=self.generator).tolist()
            idx.append(self._order.pop())
        g = _to_device(collate([self.dataset[k] for k in idx]), device)
        g["head"] = torch.full((len(idx),), self.head_index, dtype=torch.long, device=device)
        return g

    def loss(self, model, loss_fn, device, world_size: int = 1):
        """Weighted loss of the pretrained head on the next replay batch."""
        g = self.next_batch(device)
        out = model(g, compute_force=True, compute_stress=self.has_stress, create_graph=True)
        loss, _ = loss_fn(out, g, world_size=world_size)
        return self.weight * loss

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self._order)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order = list(state["order"])
