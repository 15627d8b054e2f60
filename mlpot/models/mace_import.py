"""Import a mace-torch model exported by ``scripts/export_mace.py`` into an mlpot :class:`MACE`.

The export folder holds ``hyperparameters.json`` and ``weights.safetensors`` (mace-torch's
``state_dict`` under its own names). :func:`import_mace` builds the mlpot model with the same
architecture and copies every weight; the result gives the same energies, forces and stress as
mace-torch (to float64 round-off).

Weight mapping (mace-torch name -> mlpot name):

* identical names for the embedding, radial basis buffers, ``linear_up``, the radial MLP
  (``conv_tp_weights.layer*``), ``linear``, ``skip_tp``, ``products.*.linear``, readouts and
  ``scale_shift``;
* ``products.t.symmetric_contractions.contractions.k.U_matrix_nu`` -> same name, with a leading
  axis of size 1 added for scalar outputs (mlpot always keeps the output-component axis);
* ``...contractions.k.weights_max`` -> ``weights_{correlation}`` and ``weights.j`` ->
  ``weights_{correlation - 1 - j}``;
* ``atomic_energies_fn.atomic_energies`` -> the model's ``e0s`` (one row per head);
* ``radial_embedding.distance_transform.*``, ``radial_embedding.bessel_fn.*`` (Gaussian / Chebyshev
  too) and ``pair_repulsion_fn.*`` -> same names (:mod:`mlpot.nn.radial`);
* a format-2 export's sparse ``U`` matrices (``NAME.coo_*``) are made dense again.

Wigner 3j symbols: e3nn changed the sign of some ``wigner_3j(l1, l2, l3)`` between versions. The
export carries the symbols of the e3nn that built the model; where one of the message product's
paths differs from mlpot's by a sign, the sign is folded into the columns of the radial MLP's
last layer that weight that path (the path output is linear in its weight), which leaves the
model's function unchanged. Any other difference is an error.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mlpot.errors import ModelFileError

__all__ = ["UNSUPPORTED_HINT", "import_mace", "read_export"]

EXPORT_FORMAT = "mlpot-mace-export"
EXPORT_VERSION = 2
SUPPORTED_MODELS = ("MACE", "ScaleShiftMACE")
UNSUPPORTED_HINT = (
    "mlpot imports MACE / ScaleShiftMACE with every mace.modules.interaction_classes block, any "
    "radial_type / distance_transform, heads, pair repulsion, edge_irreps (see the README table)"
)

# mace-torch state-dict entries that carry no information mlpot needs (derived from the architecture)
_IGNORED_SUFFIXES = ("output_mask", "_zeroed")
_IGNORED_KEYS = ("atomic_numbers", "r_max", "num_interactions", "atomic_energies_fn.atomic_energies")


def read_export(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(hyperparameters, state_dict)`` of an export folder."""
    path = Path(path)
    hp_file, w_file = path / "hyperparameters.json", path / "weights.safetensors"
    for f in (hp_file, w_file):
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: export the mace-torch model with scripts/export_mace.py first")
    hp = json.loads(hp_file.read_text())
    if hp.get("format") != EXPORT_FORMAT:
        raise ModelFileError(f"{hp_file}: not an mlpot MACE export (format {hp.get('format')!r})")
    if int(hp.get("format_version", 0)) > EXPORT_VERSION:
        raise ModelFileError(f"{hp_file}: export format version {hp['format_version']} is newer than this mlpot")
    from safetensors.torch import load_file

    return hp, _dense(load_file(str(w_file)))


def _dense(state: dict) -> dict:
    """Rebuild the tensors an export (format 2) stored as coordinates / values / shape."""
    out = {k: v for k, v in state.items() if not k.endswith((".coo_indices", ".coo_values", ".coo_shape"))}
    for k in state:
        if k.endswith(".coo_values"):
            name = k[: -len(".coo_values")]
            shape = [int(n) for n in state[name + ".coo_shape"].tolist()]
            dense = torch.zeros(shape, dtype=state[k].dtype)
            dense[tuple(state[name + ".coo_indices"].long())] = state[k]
            out[name] = dense
    return out


def _check_supported(hp: dict) -> None:
    from mlpot.nn.blocks import INTERACTION_BLOCKS

    problems = []
    if hp.get("model_class") not in SUPPORTED_MODELS:
        problems.append(f"model class {hp.get('model_class')!r}")
    for key in ("interaction_cls", "interaction_cls_first"):
        if hp.get(key) not in INTERACTION_BLOCKS:
            problems.append(f"{key} {hp.get(key)!r}")
    for key in ("use_so3", "use_embedding_readout", "embedding_specs", "keep_last_layer_irreps"):
        if hp.get(key):
            problems.append(f"{key}={hp.get(key)!r}")
    if hp.get("radial_type", "bessel") not in ("bessel", "gaussian", "chebyshev"):
        problems.append(f"radial_type={hp.get('radial_type')!r}")
    if hp.get("distance_transform") not in (None, "Agnesi", "Soft"):
        problems.append(f"distance_transform={hp.get('distance_transform')!r}")
    if problems:
        raise ModelFileError("mace-torch model uses features mlpot does not support: " + "; ".join(problems)
                             + f" ({UNSUPPORTED_HINT})")


def _config_from_hparams(hp: dict) -> dict:
    return {
        "r_max": float(hp["r_max"]),
        "atomic_numbers": [int(z) for z in hp["atomic_numbers"]],
        "num_bessel": int(hp["num_bessel"]),
        "num_polynomial_cutoff": int(hp["num_polynomial_cutoff"]),
        "max_ell": int(hp["max_ell"]),
        "hidden_irreps": str(hp["hidden_irreps"]),
        "correlation": [int(c) for c in hp["correlation"]],
        "num_interactions": int(hp["num_interactions"]),
        "MLP_irreps": str(hp["MLP_irreps"]),
        "gate": hp.get("gate"),
        "radial_MLP": [int(h) for h in hp["radial_MLP"]],
        "avg_num_neighbors": float(hp["avg_num_neighbors"]),
        "heads": [str(h) for h in hp.get("heads") or ["Default"]],
        "e0s": hp["atomic_energies"],
        "scale": hp.get("scale", 1.0),
        "shift": hp.get("shift", 0.0),
        "interaction_cls": hp["interaction_cls"],
        "interaction_cls_first": hp["interaction_cls_first"],
        "pair_repulsion": bool(hp.get("pair_repulsion", False)),
        "distance_transform": hp.get("distance_transform"),
        "radial_type": hp.get("radial_type", "bessel"),
        "apply_cutoff": bool(hp.get("apply_cutoff", True)),
        "use_agnostic_product": bool(hp.get("use_agnostic_product", False)),
        "use_last_readout_only": bool(hp.get("use_last_readout_only", False)),
        "edge_irreps": hp.get("edge_irreps"),
        "use_edge_irreps_first": bool(hp.get("use_edge_irreps_first", False)),
        "interaction_tp": "cg",
        "product": "symmetric",
        "product_basis_sizes": hp["product_basis_sizes"],
        "subtract_isolated": False,
        "dtype": str(hp.get("dtype", "float64")),
        # each op on its fastest backend for the device (the CPU kernels on the CPU, Triton on CUDA)
        "backend": "auto",
    }


def _path_signs(model, hp: dict) -> list[list[float]]:
    """Per layer and message path: +1 / -1 between the export's and mlpot's ``wigner_3j``."""
    from e3nn import o3

    table = {tuple(int(v) for v in k.split(",")): torch.tensor(v, dtype=torch.float64)
             for k, v in hp["wigner_3j"].items()}

    def sign(l1, l2, l3, what) -> float:
        theirs = table.get((l1, l2, l3))
        if theirs is None:
            raise ModelFileError(f"export lacks wigner_3j({l1},{l2},{l3}) needed by {what}")
        ours = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
        if theirs.shape != ours.shape:
            raise ModelFileError(f"wigner_3j({l1},{l2},{l3}) has shape {tuple(theirs.shape)} in the export")
        if torch.allclose(theirs, ours, atol=1e-10):
            return 1.0
        if torch.allclose(theirs, -ours, atol=1e-10):
            return -1.0
        raise ModelFileError(f"wigner_3j({l1},{l2},{l3}) of the export differs from mlpot's by more than a sign")

    signs = []
    for t, inter in enumerate(model.interactions):
        tp = inter.conv_tp
        exp = hp["conv_tp"][t]
        mine = [list(i) for i in tp.instructions]
        if [list(i) for i in exp["instructions"]] != mine or str(tp.irreps_out) != exp["irreps_out"].replace(" ", ""):
            raise ModelFileError(
                f"layer {t}: the message product differs (mace-torch {exp['irreps_out']} {exp['instructions']}, "
                f"mlpot {tp.irreps_out} {mine})"
            )
        if any(m != "uvu" for m in exp.get("modes", [])):
            raise ModelFileError(f"layer {t}: message product modes {exp['modes']} (only uvu)")
        layer = []
        for i1, i2, io in tp.instructions:
            l1, l2, l3 = tp.irreps_in1[i1].ir.l, tp.irreps_in2[i2].ir.l, tp.irreps_out[io].ir.l
            layer.append(sign(l1, l2, l3, f"message path {l1}x{l2}->{l3} of layer {t}"))
        signs.append(layer)
        sk = getattr(inter, "skip_tp", None)
        for ins in (sk.instructions if hasattr(sk, "irreps_in2") else []):  # a plain Linear has no CG
            ls = (sk.irreps_in1[ins.i_in1].ir.l, sk.irreps_in2[ins.i_in2].ir.l, sk.irreps_out[ins.i_out].ir.l)
            if sign(*ls, f"self-connection path of layer {t}") != 1.0:
                raise ModelFileError(f"wigner_3j{ls} of the self connection differs in sign (not supported)")
    return signs


def _mace_key(key: str, model) -> str | None:
    """mace-torch state-dict name of an mlpot parameter/buffer, or None (derived, not imported)."""
    parts = key.split(".")
    if len(parts) >= 6 and parts[0] == "products" and parts[2] == "symmetric_contractions":
        t = int(parts[1])
        corr = model.config["correlation"][t]
        leaf = parts[-1]
        base = ".".join(parts[:-1])
        if leaf.startswith("weights_"):
            nu = int(leaf.split("_")[1])
            return f"{base}.weights_max" if nu == corr else f"{base}.weights.{corr - 1 - nu}"
        return key
    return key


def import_mace(path):
    """Build the mlpot MACE of a mace-torch export folder (see the module docstring)."""
    from mlpot.models.mace import MACE, ScaleShiftMACE

    hp, theirs = read_export(path)
    _check_supported(hp)
    config = _config_from_hparams(hp)
    cls = ScaleShiftMACE if hp["model_class"] == "ScaleShiftMACE" else MACE
    model = cls(**config)
    signs = _path_signs(model, hp)
    ours = model.state_dict()
    new_state = {}
    used = set()
    for key, value in ours.items():
        if key == "atomic_energies":
            new_state[key] = value
            continue
        src = _mace_key(key, model)
        if src not in theirs:
            # derived buffers; scale/shift of a plain MACE (1, 0) come from the config
            if key.endswith(_IGNORED_SUFFIXES) or value.numel() == 0 or key.startswith("scale_shift."):
                new_state[key] = value
                continue
            raise ModelFileError(f"{path}: the export has no weight {src!r} (for mlpot's {key!r})")
        t = theirs[src]
        used.add(src)
        if key.endswith(_IGNORED_SUFFIXES) or value.numel() == 0:
            new_state[key] = value
            continue
        if t.shape != value.shape:
            if t.numel() == value.numel():
                # size-1 axes: mace-torch drops the output axis of scalar U matrices and keeps a
                # head axis on scale/shift
                t = t.reshape(value.shape)
            else:
                raise ModelFileError(
                    f"{path}: weight {src!r} has shape {tuple(t.shape)}, mlpot's {key!r} needs {tuple(value.shape)}"
                )
        new_state[key] = t.to(value.dtype)
    unused = [
        k for k in theirs
        if k not in used and k not in _IGNORED_KEYS and not k.endswith(_IGNORED_SUFFIXES)
        and ("._compiled_main" not in k) and theirs[k].numel() > 0
    ]
    if unused:
        raise ModelFileError(f"{path}: weights mlpot does not know how to use: {unused[:8]}")
    # fold the sign convention of the exporting e3nn into the radial MLPs' last layers
    for t, layer_signs in enumerate(signs):
        inter = model.interactions[t]
        mlp = inter.conv_tp_weights
        if hasattr(mlp, "net"):  # LayerNormRadialMLP: torch Linear (out, in) with a bias
            last = f"interactions.{t}.conv_tp_weights.net.{len(mlp.net) - 1}"
            keys = [(f"{last}.weight", 0), (f"{last}.bias", 0)]
        else:  # e3nn FullyConnectedNet: weight (in, out), no bias
            keys = [(f"interactions.{t}.conv_tp_weights.layer{len(mlp) - 1}.weight", 1)]
        for key, axis in keys:
            W = new_state[key].clone()
            off = 0
            for s, (a, b) in zip(layer_signs, inter.conv_tp.weight_shapes):
                W.narrow(axis, off, a * b).mul_(s)
                off += a * b
            new_state[key] = W
    model.load_state_dict(new_state, strict=True)
    model.metadata = {
        "imported_from": "mace-torch",
        "source": str(path),
        **{f"source_{k}": v for k, v in hp.get("source", {}).items()},
        "flipped_cg_paths": sum(s < 0 for layer in signs for s in layer),
    }
    model.eval()
    return model
