"""Training configs: the schema, defaults, validation and ``--set`` overrides.

A config is one YAML file with sections ``data``, ``model``, ``training`` and the top-level
keys ``output``, ``seed``, ``device``, ``dtype``. :func:`load_config` reads it, applies
``--set key.sub=value`` overrides, checks every key and value against :data:`SCHEMA`
and fills in defaults. Any problem is one :class:`~mlpot.errors.ConfigError` naming the key
(with a "did you mean" hint for typos), raised before anything runs.

The ``model`` section is open: besides ``name`` and the keys the trainer fills in
(``r_max``, ``avg_num_neighbors``, ``e0s``, ``scale``, ``shift``, ``atomic_numbers``), its
keys are the model class's constructor arguments, checked against its signature.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
from pathlib import Path
from typing import Any

import yaml

from mlpot.errors import ConfigError

__all__ = ["SCHEMA", "load_config", "validate_config", "apply_override", "dump_config", "default_config"]


@dataclasses.dataclass
class Field:
    types: tuple
    default: Any = None
    choices: tuple | None = None
    doc: str = ""
    required: bool = False


def F(types, default=None, choices=None, doc="", required=False) -> Field:
    if not isinstance(types, tuple):
        types = (types,)
    return Field(types, default, choices, doc, required)


NoneType = type(None)
_num = (int, float)

DATA_SCHEMA: dict[str, Any] = {
    "train": F((str, list, NoneType), None, doc="training file(s); filled in by `synthetic`"),
    "valid": F((str, float, NoneType), 0.1, doc="validation file, or a fraction of `train` held out"),
    "test": F((str, list, dict, NoneType), None, doc="test file, list of files, or {name: file}"),
    "format": F((str, NoneType), None, doc="file format (default: from the suffix)"),
    "keys": {
        "energy": F((str, NoneType), None),
        "forces": F((str, NoneType), None),
        "stress": F((str, NoneType), None),
        "virials": F((str, NoneType), None),
        "config_type": F(str, "config_type"),
    },
    "units": {
        "energy": F((str, float, NoneType), None),
        "length": F((str, float, NoneType), None),
        "stress": F((str, float, NoneType), None),
    },
    "isolated_atoms": F((str, NoneType), None, doc="file of isolated-atom energies (for model.e0s: isolated)"),
    "max_train": F((int, NoneType), None, doc="use only the first N training frames"),
    "min_distance": F(_num, 0.1, doc="atoms closer than this (Å) are an error; 0: no check"),
    "synthetic": F((dict, NoneType), None, doc="generate the built-in EMT Cu-Ni dataset (mlpot.data.synthetic)"),
}

SYNTHETIC_SCHEMA: dict[str, Any] = {
    "system": F(str, "cu-ni", choices=("cu-ni", "cu", "ni", "molecules")),
    "hessian": F(bool, False, doc="label every structure with its EMT Hessian (finite differences)"),
    "n_train": F(int, 200),
    "n_valid": F(int, 40),
    "n_test": F(int, 60),
    "seed": F(int, 0),
    "cache_dir": F((str, NoneType), None, doc="where to write the files (default: <output>/data)"),
}

STAGE_TWO_SCHEMA: dict[str, Any] = {
    "start": F(_num, 0.75, doc="epoch (int >= 1) or fraction of `epochs` (0 < x < 1)"),
    "energy_weight": F(_num, 1000.0),
    "forces_weight": F(_num, 100.0),
    "stress_weight": F((int, float, NoneType), None, doc="default: unchanged"),
    "lr": F(_num, 1e-3),
}

TRAINING_SCHEMA: dict[str, Any] = {
    "epochs": F(int, 100),
    "batch_size": F(int, 5),
    "valid_batch_size": F((int, NoneType), None, doc="default: 2 x batch_size"),
    "lr": F(_num, 1e-2),
    "optimizer": F(str, "adam", choices=("adam", "adamw")),
    "amsgrad": F(bool, True),
    "weight_decay": F(_num, 0.0),
    "scheduler": F(str, "plateau", choices=("plateau", "cosine", "none")),
    "scheduler_params": F(dict, {}, doc="plateau: factor, patience, threshold, min_lr; cosine: eta_min, t_max"),
    "clip_grad": F((int, float, NoneType), 10.0),
    "ema": F(bool, True),
    "ema_decay": F(_num, 0.99),
    "loss": F(str, "mse", choices=("mse", "huber", "universal")),
    "huber_delta": F(_num, 0.01),
    "energy_weight": F(_num, 1.0),
    "forces_weight": F(_num, 100.0),
    "stress_weight": F(_num, 1.0),
    "hessian_weight": F(_num, 0.0, doc="weight of the Hessian loss (needs model.hessian_head: true and Hessian data)"),
    "config_type_weights": F(dict, {}, doc="{config_type: weight}"),
    "stage_two": F((dict, NoneType), None, doc="MACE's second stage (SWA): higher energy weight, new lr"),
    "patience": F((int, NoneType), None, doc="early stopping: epochs without validation improvement"),
    "eval_every": F(int, 1, doc="validate every N epochs"),
    "checkpoint_every": F(int, 1),
    "num_workers": F(int, 0),
    "time_limit": F((int, float, NoneType), None, doc="minutes of training; then stop cleanly and evaluate"),
    "progress": F((bool, NoneType), None, doc="progress bar (default: when stderr is a terminal)"),
    "tensorboard": F(bool, False),
    "wandb": F((bool, dict), False, doc="Weights & Biases: true or {project, entity, name, mode, tags}"),
    # fine-tuning (mlpot.train.finetune)
    "freeze": F(list, [], doc="module prefixes whose parameters stay fixed, e.g. [node_embedding, interactions.0]"),
}

SCHEDULER_PARAMS = {
    "plateau": {"factor": _num, "patience": int, "threshold": _num, "min_lr": _num},
    "cosine": {"eta_min": _num, "t_max": int},
    "none": {},
}

MODEL_RESERVED: dict[str, Any] = {
    "name": F(str, "MACE"),
    "r_max": F(_num, 5.0),
    "atomic_numbers": F((list, NoneType), None, doc="default: the elements of the training data"),
    "avg_num_neighbors": F((int, float, str), "auto"),
    "e0s": F((str, dict, list), "average", doc="average (least squares) | isolated | {element: eV}"),
    "scale": F((int, float, str), "auto", doc="auto: RMS of training forces"),
    "shift": F((int, float, str), "auto", doc="auto: mean interaction energy per atom"),
    # fine-tuning (mlpot.train.finetune): the architecture and weights come from this file
    "init_from": F((str, NoneType), None, doc="mlpot model file (or mace-torch export folder) to start from"),
}

#: model keys that may stand beside `model.init_from` (the rest comes from the file)
INIT_FROM_KEYS = ("name", "init_from", "e0s")

FINETUNE_SCHEMA: dict[str, Any] = {
    "head": F((str, NoneType), None, doc="name of a new head trained on `data` (multi-head replay fine-tuning)"),
    "pretrained_head": F((str, NoneType), None, doc="the pretrained model's head kept by the replay set "
                         "(default: its default head)"),
    "replay": F((str, NoneType), None, doc="replay file: frames labelled for the pretrained head"),
    "replay_weight": F(_num, 1.0, doc="weight of the replay loss against the new head's loss"),
    "replay_batch_size": F((int, NoneType), None, doc="replay frames per step (default: training.batch_size)"),
}

SCHEMA: dict[str, Any] = {
    "output": F(str, "runs/default", doc="run directory"),
    "seed": F(int, 0),
    "device": F(str, "auto", choices=("auto", "cpu", "cuda")),
    "dtype": F(str, "float64", choices=("float64", "float32")),
    "data": DATA_SCHEMA,
    "model": MODEL_RESERVED,
    "training": TRAINING_SCHEMA,
    "finetune": FINETUNE_SCHEMA,
}


def _type_name(types) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "true/false", list: "list",
             dict: "mapping", NoneType: "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _check_type(key: str, value, field: Field):
    types = field.types
    ok = False
    for t in types:
        if t is bool:
            ok = ok or isinstance(value, bool)
        elif t is int:
            ok = ok or (isinstance(value, int) and not isinstance(value, bool))
        elif t is float:
            ok = ok or (isinstance(value, (int, float)) and not isinstance(value, bool))
        else:
            ok = ok or isinstance(value, t)
    if not ok:
        raise ConfigError(f"config key `{key}`: expected {_type_name(types)}, got {value!r} ({type(value).__name__})")
    if field.choices is not None and value not in field.choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in field.choices], n=1)
        msg = f"config key `{key}`: {value!r} is not one of {list(field.choices)}"
        raise ConfigError(msg + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key `{key}`: must be a finite number, got {value}")


def _unknown(key: str, known) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: -len(leaf)]
    hint = difflib.get_close_matches(leaf, list(known), n=1, cutoff=0.6)
    msg = f"unknown config key `{key}`"
    if hint:
        msg += f"; did you mean `{prefix}{hint[0]}`?"
    else:
        msg += f" (known keys here: {', '.join(sorted(known))})"
    return ConfigError(msg)


def _fill(schema: dict, given: dict | None, prefix: str) -> dict:
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise ConfigError(f"config key `{prefix.rstrip('.')}` must be a mapping, got {given!r}")
    for k in given:
        if not isinstance(k, str):
            raise ConfigError(f"config key `{prefix}{k}`: keys must be strings")
        if k not in schema:
            raise _unknown(prefix + k, schema)
    out = {}
    for k, spec in schema.items():
        key = prefix + k
        if isinstance(spec, dict):
            out[k] = _fill(spec, given.get(k), key + ".")
            continue
        if k in given:
            value = given[k]
            _check_type(key, value, spec)
            out[k] = copy.deepcopy(value)
        else:
            if spec.required:
                raise ConfigError(f"config key `{key}` is required")
            out[k] = copy.deepcopy(spec.default)
    return out


def _model_signature(name: str):
    """Constructor parameter names of the model class, or None when it takes **kwargs."""
    from mlpot.models.base import get_model_class

    cls = get_model_class(name)
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return [p for p in params if p != "self"]


def _validate_model(model: dict | None) -> dict:
    model = {} if model is None else model
    if not isinstance(model, dict):
        raise ConfigError(f"config key `model` must be a mapping, got {model!r}")
    out = {}
    for k, spec in MODEL_RESERVED.items():
        if k in model:
            _check_type(f"model.{k}", model[k], spec)
            out[k] = copy.deepcopy(model[k])
        else:
            out[k] = copy.deepcopy(spec.default)
    for k in ("avg_num_neighbors", "scale", "shift"):
        if isinstance(out[k], str) and out[k] != "auto":
            raise ConfigError(f"config key `model.{k}`: use a number or 'auto', got {out[k]!r}")
    if isinstance(out["e0s"], str) and out["e0s"] not in ("average", "isolated", "fit"):
        hint = difflib.get_close_matches(out["e0s"], ["average", "isolated"], n=1)
        raise ConfigError(
            f"config key `model.e0s`: {out['e0s']!r} is not 'average', 'isolated' or a mapping"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
        )
    try:
        allowed = _model_signature(out["name"])
    except ConfigError as exc:
        raise ConfigError(f"config key `model.name`: {exc}") from None
    except ImportError as exc:
        raise ConfigError(f"config key `model.name`: model {out['name']!r} is not available ({exc})") from None
    extra = {k: v for k, v in model.items() if k not in MODEL_RESERVED}
    if out["init_from"] is not None:  # fine-tuning: the architecture comes from the file
        for k in model:
            if k not in INIT_FROM_KEYS:
                raise ConfigError(
                    f"config key `model.{k}`: the model comes from `model.init_from` ({out['init_from']}); "
                    f"beside it only {', '.join(INIT_FROM_KEYS[1:])} may be given"
                )
    if allowed is not None:
        for k in extra:
            if k not in allowed or k == "dtype":
                raise _unknown(f"model.{k}", [a for a in allowed if a != "dtype"] + list(MODEL_RESERVED))
    out.update(copy.deepcopy(extra))
    return out


def validate_config(raw: dict, base_dir: Path | None = None, check_files: bool = True) -> dict:
    """Check a raw config dict and return it completed with defaults (a new dict)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a YAML mapping at the top level")
    _check_finite(raw, "")
    top = {k: v for k, v in SCHEMA.items() if k != "model"}
    for k in raw:
        if k not in SCHEMA:
            raise _unknown(str(k), SCHEMA)
    cfg = _fill(top, {k: v for k, v in raw.items() if k != "model"}, "")
    cfg["model"] = _validate_model(raw.get("model"))
    tr, data = cfg["training"], cfg["data"]

    # sub-sections
    if data["synthetic"] is not None:
        data["synthetic"] = _fill(SYNTHETIC_SCHEMA, data["synthetic"], "data.synthetic.")
        if data["train"] is not None:
            raise ConfigError("config: give either `data.train` or `data.synthetic`, not both")
    elif data["train"] is None:
        raise ConfigError("config key `data.train` is required (a file, or use `data.synthetic`)")
    if tr["stage_two"] is not None:
        tr["stage_two"] = _fill(STAGE_TWO_SCHEMA, tr["stage_two"], "training.stage_two.")
        s = tr["stage_two"]["start"]
        if isinstance(s, float) and not 0.0 < s < 1.0:
            raise ConfigError(f"config key `training.stage_two.start`: a fraction must be in (0, 1), got {s}")
        if isinstance(s, int) and s < 1:
            raise ConfigError(f"config key `training.stage_two.start`: epoch must be >= 1, got {s}")
    allowed = SCHEDULER_PARAMS[tr["scheduler"]]
    for k, v in tr["scheduler_params"].items():
        if k not in allowed:
            raise _unknown(f"training.scheduler_params.{k}", allowed)
        _check_type(f"training.scheduler_params.{k}", v, F(allowed[k]))
    for k, v in tr["config_type_weights"].items():
        _check_type(f"training.config_type_weights.{k}", v, F(_num))

    _check_ranges(cfg)
    _check_finetune(cfg)
    if isinstance(data["test"], dict):
        for name in data["test"]:
            if str(name) in ("train", "valid"):
                raise ConfigError(
                    f"config key `data.test.{name}`: the name {name!r} is taken by the {name} split; "
                    "choose another name for this test set"
                )

    if check_files:
        _check_files(cfg, base_dir)
    return cfg


def _check_finetune(cfg: dict) -> None:
    """Multi-head replay fine-tuning is all or nothing: a new head needs `model.init_from` and a
    replay set, and a replay set needs a new head (it never turns itself off silently)."""
    ft = cfg["finetune"]
    if ft["head"] is not None or ft["replay"] is not None or ft["pretrained_head"] is not None:
        if cfg["model"]["init_from"] is None:
            raise ConfigError("config section `finetune`: needs `model.init_from` (the pretrained model)")
        if ft["head"] is None:
            raise ConfigError("config key `finetune.head` is required with `finetune.replay`: name the new head "
                              "that is trained on `data` while the replay set keeps the pretrained head")
        if ft["replay"] is None:
            raise ConfigError(
                "config key `finetune.replay` is required with `finetune.head`: without a replay set the shared "
                "layers drift away from the pretrained head; give a replay file, or drop `finetune.head` for "
                "plain fine-tuning"
            )
        if not ft["head"].strip():
            raise ConfigError("config key `finetune.head`: empty head name")
    if ft["replay_weight"] <= 0:
        raise ConfigError(f"config key `finetune.replay_weight` must be > 0, got {ft['replay_weight']}")
    if ft["replay_batch_size"] is not None and ft["replay_batch_size"] < 1:
        raise ConfigError(f"config key `finetune.replay_batch_size` must be >= 1, got {ft['replay_batch_size']}")
    for k, v in enumerate(cfg["training"]["freeze"]):
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"config key `training.freeze[{k}]`: expected a module prefix, got {v!r}")


# key -> (low, high, low included, high included); None = unbounded
RANGES: dict[str, tuple] = {
    "seed": (0, None, True, True),
    "data.max_train": (1, None, True, True),
    "data.min_distance": (0.0, None, True, True),
    "data.valid": (0.0, 1.0, True, False),  # as a fraction
    "data.synthetic.n_train": (1, None, True, True),
    "data.synthetic.n_valid": (0, None, True, True),
    "data.synthetic.n_test": (0, None, True, True),
    "data.synthetic.seed": (0, None, True, True),
    "training.epochs": (1, None, True, True),
    "training.batch_size": (1, None, True, True),
    "training.valid_batch_size": (1, None, True, True),
    "training.lr": (0.0, None, False, True),
    "training.weight_decay": (0.0, None, True, True),
    "training.clip_grad": (0.0, None, False, True),
    "training.ema_decay": (0.0, 1.0, True, False),
    "training.huber_delta": (0.0, None, False, True),
    "training.energy_weight": (0.0, None, True, True),
    "training.forces_weight": (0.0, None, True, True),
    "training.stress_weight": (0.0, None, True, True),
    "training.hessian_weight": (0.0, None, True, True),
    "training.patience": (1, None, True, True),
    "training.eval_every": (1, None, True, True),
    "training.checkpoint_every": (1, None, True, True),
    "training.num_workers": (0, None, True, True),
    "training.time_limit": (0.0, None, False, True),
    "training.config_type_weights.*": (0.0, None, True, True),
    "training.scheduler_params.factor": (0.0, 1.0, False, False),
    "training.scheduler_params.patience": (0, None, True, True),
    "training.scheduler_params.threshold": (0.0, None, True, True),
    "training.scheduler_params.min_lr": (0.0, None, True, True),
    "training.scheduler_params.eta_min": (0.0, None, True, True),
    "training.scheduler_params.t_max": (1, None, True, True),
    "training.stage_two.energy_weight": (0.0, None, True, True),
    "training.stage_two.forces_weight": (0.0, None, True, True),
    "training.stage_two.stress_weight": (0.0, None, True, True),
    "training.stage_two.lr": (0.0, None, False, True),
    "model.r_max": (0.0, None, False, True),
    "model.avg_num_neighbors": (0.0, None, False, True),
    "model.scale": (0.0, None, False, True),
    # constructor arguments shared by the registered models (checked when given)
    "model.max_ell": (0, None, True, True),
    "model.max_L": (0, None, True, True),
    "model.correlation": (1, None, True, True),
    "model.num_interactions": (1, None, True, True),
    "model.num_channels": (1, None, True, True),
    "model.num_bessel": (1, None, True, True),
    "model.num_polynomial_cutoff": (1, None, True, True),
    "model.num_radial": (1, None, True, True),
    "model.hidden": (1, None, True, True),
    "model.lmax": (0, None, True, True),
    "model.mmax": (0, None, True, True),
}
_IRREPS_KEYS = ("model.hidden_irreps", "model.MLP_irreps")


def _range_text(lo, hi, lo_inc, hi_inc) -> str:
    if hi is None:
        return f"{'>=' if lo_inc else '>'} {lo}"
    return f"in {'[' if lo_inc else '('}{lo}, {hi}{']' if hi_inc else ')'}"


def _check_value_range(key: str, value, spec) -> None:
    lo, hi, lo_inc, hi_inc = spec
    values = value if isinstance(value, (list, tuple)) else [value]  # e.g. correlation per layer
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if isinstance(value, (list, tuple)) or key.startswith("model."):
                raise ConfigError(f"config key `{key}`: expected a number {_range_text(*spec)}, got {v!r}")
            continue
        ok = (lo is None or (v >= lo if lo_inc else v > lo)) and (hi is None or (v <= hi if hi_inc else v < hi))
        if not ok:
            raise ConfigError(f"config key `{key}` must be {_range_text(*spec)}, got {v}")


def _check_ranges(cfg: dict) -> None:
    """Every numeric key within its range (:data:`RANGES`), the message naming the range."""
    for key, spec in RANGES.items():
        parts = key.split(".")
        node = cfg
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if parts[-1] == "*":
            items = [(f"{'.'.join(parts[:-1])}.{k}", v) for k, v in node.items()]
        elif parts[-1] in node:
            items = [(key, node[parts[-1]])]
        else:
            items = []
        for k, v in items:
            if v is None or (key == "data.valid" and not isinstance(v, float)):
                continue
            if key.startswith("model.") and v == "auto":
                continue
            _check_value_range(k, v, spec)
    for key in _IRREPS_KEYS:
        value = cfg["model"].get(key.split(".")[1])
        if value is None:
            continue
        try:
            from e3nn import o3

            irreps = o3.Irreps(value)
        except Exception as exc:  # noqa: BLE001 - e3nn's parse errors vary
            raise ConfigError(
                f"config key `{key}`: {value!r} is not an irreps string like '64x0e + 64x1o' ({exc})"
            ) from None
        if irreps.dim == 0:
            raise ConfigError(f"config key `{key}`: {value!r} has no channels")


def _check_finite(value, key: str) -> None:
    """No NaN or infinity anywhere in a config (YAML's .nan / .inf)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for k, v in enumerate(value):
            _check_finite(v, f"{key}[{k}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key `{key}`: must be a finite number, got {value}")


def _resolve(path: str, base_dir: Path | None) -> str:
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if not p.is_absolute() and base_dir is not None and not p.exists() and (base_dir / p).exists():
        p = base_dir / p
    return str(p)


def _check_files(cfg: dict, base_dir: Path | None) -> None:
    data = cfg["data"]

    def check(key, value):
        resolved = _resolve(value, base_dir)
        if not Path(resolved).exists():
            raise ConfigError(f"config key `{key}`: file not found: {value}")
        return resolved

    if isinstance(data["train"], str):
        data["train"] = check("data.train", data["train"])
    elif isinstance(data["train"], list):
        data["train"] = [check(f"data.train[{k}]", v) for k, v in enumerate(data["train"])]
    if isinstance(data["valid"], str):
        data["valid"] = check("data.valid", data["valid"])
    if isinstance(data["test"], str):
        data["test"] = check("data.test", data["test"])
    elif isinstance(data["test"], list):
        data["test"] = [check(f"data.test[{k}]", v) for k, v in enumerate(data["test"])]
    elif isinstance(data["test"], dict):
        data["test"] = {n: check(f"data.test.{n}", v) for n, v in data["test"].items()}
    if data["isolated_atoms"] is not None:
        data["isolated_atoms"] = check("data.isolated_atoms", data["isolated_atoms"])
    if cfg["model"].get("init_from") is not None:
        cfg["model"]["init_from"] = check("model.init_from", cfg["model"]["init_from"])
    if cfg["finetune"]["replay"] is not None:
        cfg["finetune"]["replay"] = check("finetune.replay", cfg["finetune"]["replay"])


def apply_override(cfg: dict, assignment: str) -> None:
    """Apply one ``key.sub=value`` (value parsed as YAML) to a raw config dict, in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value")
    key, _, text = assignment.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {text!r}: {exc}") from None
    parts = key.split(".")
    node = cfg
    for k, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: `{'.'.join(parts[:k + 1])}` is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path=None, overrides: list[str] | None = None, check_files: bool = True) -> dict:
    """Read a YAML config file, apply ``--set`` overrides, validate and complete it."""
    raw: dict = {}
    base_dir = None
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_one_line(exc)}") from None
        base_dir = path.parent
    for o in overrides or []:
        apply_override(raw, o)
    return validate_config(raw, base_dir=base_dir, check_files=check_files)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key!r} (lines {seen[key] + 1} and {key_node.start_mark.line + 1})"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


def default_config() -> dict:
    """The defaults of every key (``data.train`` left empty)."""
    top = {k: v for k, v in SCHEMA.items() if k != "model"}
    cfg = _fill(top, {}, "")
    cfg["model"] = {k: copy.deepcopy(f.default) for k, f in MODEL_RESERVED.items()}
    return cfg


def dump_config(cfg: dict, path) -> None:
    """Write the resolved config as YAML, atomically."""
    from mlpot.fileio import atomic_open

    with atomic_open(path, "w") as fh:
        yaml.safe_dump(_plain(cfg), fh, sort_keys=False)


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    return x
