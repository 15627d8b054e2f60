#!/usr/bin/env python
"""Export a mace-torch model to a neutral format that mlpot imports (runs in the *mace* venv).

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 .venv-mace/bin/python scripts/export_mace.py IN.model OUT_DIR

``IN.model`` is what ``mace_run_train`` writes (``torch.save(model)`` of a ``MACE`` or
``ScaleShiftMACE``); from Python, ``export(model, out_dir)`` takes a model object built with
``mace.modules.MACE`` / ``ScaleShiftMACE`` directly.

``OUT_DIR`` receives

* ``hyperparameters.json``: the architecture (mace-torch's hyperparameter names), the species
  and E0s, scale/shift, ``avg_num_neighbors``, the number of coupling columns of every
  symmetric contraction, the message tensor-product instructions, and the Wigner 3j symbols of
  the e3nn version that built the model (mlpot compares them with its own and folds any sign
  difference into the radial MLP, so the function is unchanged);
* ``weights.safetensors``: the model's ``state_dict`` (parameters and buffers, including the
  ``U`` matrices of the product basis, the atomic energies and scale/shift), under mace-torch's
  own names. Written by a small writer here, so only mace-torch's own dependencies are needed.

Then, in mlpot's environment::

    mlpot import-mace OUT_DIR model.pt

Unsupported mace-torch features (multi-head models, ZBL pair repulsion, interaction classes
other than ``RealAgnostic[Residual]InteractionBlock``, non-Bessel radial bases, distance
transforms, cuequivariance/OEQ layouts, LoRA, embeddings of extra inputs, other model classes)
are a clear error naming them.

End-to-end check (two venvs, both from the repository root)::

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 .venv-mace/bin/python scripts/make_mace_fixture.py --out /tmp/mace_fx
    .venv/bin/mlpot import-mace /tmp/mace_fx /tmp/mace_fx/mlpot.pt
    .venv/bin/python -m pytest tests/test_mace_parity.py -q   # the committed fixture, same code path
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

FORMAT = "mlpot-mace-export"
FORMAT_VERSION = 2  # 2: sparse U matrices (``NAME.coo_indices`` / ``NAME.coo_values`` / ``NAME.coo_shape``)
SPARSE_SUFFIXES = (".coo_indices", ".coo_values", ".coo_shape")

SUPPORTED_MODELS = ("MACE", "ScaleShiftMACE")
SUPPORTED_INTERACTIONS = ("RealAgnosticResidualInteractionBlock", "RealAgnosticInteractionBlock")
RADIAL_TYPES = {"BesselBasis": "bessel", "GaussianBasis": "gaussian", "ChebychevBasis": "chebyshev"}
DISTANCE_TRANSFORMS = {"AgnesiTransform": "Agnesi", "SoftTransform": "Soft"}


class UnsupportedMaceModel(ValueError):
    """The mace-torch model uses a feature mlpot does not implement."""


# ------------------------------------------------------------------------------ safetensors
_ST_DTYPES = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def write_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Minimal writer of the safetensors format (little-endian, C order, 8-byte aligned header)."""
    header: dict = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        key = str(t.dtype)
        if key not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} not supported by the safetensors writer")
        if t.dtype == __import__("torch").bfloat16:
            raw = t.view(__import__("torch").int16).numpy().astype("<i2").tobytes()
        else:
            arr = t.numpy()
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[key], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for raw in blobs:
            fh.write(raw)
    tmp.replace(path)


# ------------------------------------------------------------------------------ inspection
def _class_name(obj) -> str:
    return type(obj).__name__


def _gate_name(readout) -> str | None:
    import torch

    acts = getattr(getattr(readout, "non_linearity", None), "acts", None)
    if not acts:
        return None
    act = acts[0]
    f = getattr(act, "f", act)
    if f is None:
        return None
    table = {
        torch.nn.functional.silu: "silu",
        torch.tanh: "tanh",
        torch.abs: "abs",
    }
    for fn, name in table.items():
        if f is fn:
            return name
    name = getattr(f, "__name__", repr(f))
    if name in ("silu", "tanh", "abs"):
        return name
    raise UnsupportedMaceModel(f"readout gate {name!r} (supported: silu, tanh, abs, None)")


def _check_supported(model) -> None:
    problems = []
    cls = _class_name(model)
    if cls not in SUPPORTED_MODELS:
        raise UnsupportedMaceModel(
            f"model class {cls!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    zbl = getattr(model, "pair_repulsion_fn", None)
    if zbl is not None and _class_name(zbl) != "ZBLBasis":
        problems.append(f"pair repulsion {_class_name(zbl)} (only ZBLBasis)")
    for k, inter in enumerate(model.interactions):
        name = _class_name(inter)
        if name not in SUPPORTED_INTERACTIONS:
            problems.append(f"interaction class {name} (layer {k}; supported: {', '.join(SUPPORTED_INTERACTIONS)})")
        if hasattr(inter, "conv_fusion"):
            problems.append(f"fused convolution (cuequivariance/OEQ conv_fusion, layer {k})")
    radial = model.radial_embedding
    if _class_name(radial.bessel_fn) not in RADIAL_TYPES:
        problems.append(f"radial basis {_class_name(radial.bessel_fn)} (supported: {', '.join(RADIAL_TYPES)})")
    if hasattr(radial, "distance_transform") and _class_name(radial.distance_transform) not in DISTANCE_TRANSFORMS:
        problems.append(f"distance transform {_class_name(radial.distance_transform)}")
    if getattr(model, "use_so3", False):
        problems.append("use_so3=True")
    if getattr(model, "use_agnostic_product", False):
        problems.append("use_agnostic_product=True")
    if getattr(model, "use_last_readout_only", False):
        problems.append("use_last_readout_only=True")
    if getattr(model, "edge_irreps", None) is not None:
        problems.append(f"edge_irreps={model.edge_irreps}")
    if hasattr(model, "joint_embedding") or hasattr(model, "embedding_readout"):
        problems.append("embeddings of extra inputs (embedding_specs)")
    n = len(model.interactions)
    for k, ro in enumerate(model.readouts):
        want = "NonLinearReadoutBlock" if (k == n - 1 and n > 1) else "LinearReadoutBlock"
        if _class_name(ro) != want:
            problems.append(f"readout {k} is {_class_name(ro)} (expected {want})")
    if len(model.readouts) != n:
        problems.append(f"{len(model.readouts)} readouts for {n} interactions")
    cueq = getattr(model, "cueq_config", None)
    if cueq is not None and getattr(cueq, "enabled", False):
        problems.append("cuequivariance layout (convert the model back to e3nn with mace's cueq_to_e3nn first)")
    if any("lora" in k.lower() for k in model.state_dict()):
        problems.append("LoRA adapters (merge them into the weights first)")
    for k, prod in enumerate(model.products):
        sc = prod.symmetric_contractions
        if _class_name(sc) != "SymmetricContraction" or not hasattr(sc, "contractions"):
            problems.append(f"product basis {_class_name(sc)} (layer {k}; only e3nn SymmetricContraction)")
    heads = list(getattr(model, "heads", None) or ["Default"])
    ae = model.atomic_energies_fn.atomic_energies  # (S,) or (heads, S)
    if ae.dim() > 1 and ae.shape[0] not in (1, len(heads)):
        problems.append(f"atomic energies for {ae.shape[0]} heads in a model with heads {heads}")
    for name in ("scale", "shift"):
        if hasattr(model, "scale_shift"):
            v = getattr(model.scale_shift, name)
            if v.numel() not in (1, len(heads)):
                problems.append(f"{name} has {v.numel()} values for heads {heads}")
    if problems:
        raise UnsupportedMaceModel("mace-torch model uses features mlpot does not support: " + "; ".join(problems))


def _irreps_lmax(irreps) -> int:
    return max((ir.l for _, ir in irreps), default=0)


def hyperparameters(model) -> dict:
    """The architecture of a (supported) mace-torch model, JSON-serialisable."""
    import e3nn
    import mace
    import torch
    from e3nn import o3

    _check_supported(model)
    interactions = list(model.interactions)
    products = list(model.products)
    avg = {float(i.avg_num_neighbors) for i in interactions}
    if len(avg) != 1:
        raise UnsupportedMaceModel(f"different avg_num_neighbors per layer: {sorted(avg)}")
    correlation = []
    basis_sizes = []
    for prod in products:
        cons = prod.symmetric_contractions.contractions
        correlation.append(len(cons[0].weights) + 1)
        layer = []
        for con in cons:
            layer.append([int(getattr(con, f"U_matrix_{nu}").shape[-1]) for nu in range(1, con.correlation + 1)])
        basis_sizes.append(layer)
    sh_lmax = int(_irreps_lmax(interactions[0].edge_attrs_irreps))
    bessel = model.radial_embedding.bessel_fn
    hidden_irreps = o3.Irreps(str(products[0].linear.irreps_out))
    if len(interactions) > 1:
        hidden_irreps = o3.Irreps(str(interactions[1].node_feats_irreps))
    heads = [str(h) for h in (getattr(model, "heads", None) or ["Default"])]
    H = len(heads)
    scale, shift = 1.0, 0.0
    if hasattr(model, "scale_shift"):
        scale = [float(v) for v in model.scale_shift.scale.reshape(-1).tolist()]
        shift = [float(v) for v in model.scale_shift.shift.reshape(-1).tolist()]
        scale = scale[0] if H == 1 or len(scale) == 1 else scale
        shift = shift[0] if H == 1 or len(shift) == 1 else shift
    ae = model.atomic_energies_fn.atomic_energies.detach().cpu()
    ae = ae.reshape(-1, len(model.atomic_numbers))  # (heads, S)
    if ae.shape[0] == 1:
        ae = ae.expand(H, -1)
    atomic_energies = ae[0].tolist() if H == 1 else ae.tolist()
    mlp_irreps = o3.Irreps(str(getattr(model.readouts[-1], "hidden_irreps", "16x0e")))
    if H > 1 and _class_name(model.readouts[-1]) == "NonLinearReadoutBlock":
        # mace-torch widens the gated readout to H blocks of MLP_irreps: report one block
        mlp_irreps = o3.Irreps([(mul // H, ir) for mul, ir in mlp_irreps])
    # the CG coefficients every message / skip product uses, from *this* e3nn
    triples = set()
    conv = []
    for inter in interactions:
        tp = inter.conv_tp
        ins = [(int(i.i_in1), int(i.i_in2), int(i.i_out)) for i in tp.instructions]
        conv.append({"irreps_in1": str(tp.irreps_in1), "irreps_in2": str(tp.irreps_in2),
                     "irreps_out": str(tp.irreps_out), "instructions": ins,
                     "modes": [str(i.connection_mode) for i in tp.instructions]})
        for i1, i2, io in ins:
            triples.add((tp.irreps_in1[i1].ir.l, tp.irreps_in2[i2].ir.l, tp.irreps_out[io].ir.l))
        sk = inter.skip_tp
        for i in sk.instructions:
            triples.add((sk.irreps_in1[i.i_in1].ir.l, sk.irreps_in2[i.i_in2].ir.l, sk.irreps_out[i.i_out].ir.l))
    w3j = {f"{a},{b},{c}": o3.wigner_3j(a, b, c, dtype=torch.float64).tolist() for a, b, c in sorted(triples)}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": _class_name(model),
        "source": {
            "mace_version": getattr(mace, "__version__", "unknown"),
            "e3nn_version": e3nn.__version__,
            "torch_version": torch.__version__,
        },
        "r_max": float(model.r_max),
        "num_bessel": int(model.radial_embedding.out_dim),
        "radial_type": RADIAL_TYPES[_class_name(bessel)],
        "distance_transform": (DISTANCE_TRANSFORMS[_class_name(model.radial_embedding.distance_transform)]
                               if hasattr(model.radial_embedding, "distance_transform") else None),
        "apply_cutoff": bool(getattr(model.radial_embedding, "apply_cutoff", True)),
        "pair_repulsion": hasattr(model, "pair_repulsion_fn"),
        "num_polynomial_cutoff": int(model.radial_embedding.cutoff_fn.p),
        "max_ell": sh_lmax,
        "hidden_irreps": str(hidden_irreps),
        "MLP_irreps": str(mlp_irreps),
        "gate": _gate_name(model.readouts[-1]),
        "num_interactions": len(interactions),
        "correlation": correlation,
        "radial_MLP": [int(layer.weight.shape[1]) for layer in list(interactions[0].conv_tp_weights)[:-1]],
        "avg_num_neighbors": avg.pop(),
        "atomic_numbers": [int(z) for z in model.atomic_numbers.tolist()],
        "heads": heads,
        "atomic_energies": atomic_energies,
        "scale": scale,
        "shift": shift,
        "interaction_cls": _class_name(interactions[-1]),
        "interaction_cls_first": _class_name(interactions[0]),
        "product_basis_sizes": basis_sizes,
        "conv_tp": conv,
        "wigner_3j": w3j,
        "dtype": dtype,
    }


def compact_json(obj: dict) -> str:
    """One top-level key per line, values compact (valid JSON, diff-friendly, small)."""
    lines = [f" {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in obj.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def export(model, out_dir) -> Path:
    """Write ``hyperparameters.json`` and ``weights.safetensors`` for ``model`` into ``out_dir``."""
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedMaceModel("a TorchScript (compiled) model: export the plain `.model` file instead")
    hp = hyperparameters(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = sparse_u_matrices(model.state_dict())
    write_safetensors(state, out / "weights.safetensors", metadata={"format": FORMAT})
    tmp = out / "hyperparameters.json.tmp"
    tmp.write_text(compact_json(hp))
    tmp.replace(out / "hyperparameters.json")
    return out


def sparse_u_matrices(state: dict, max_density: float = 0.1) -> dict:
    """The product basis's ``U`` matrices (mostly zeros) as coordinates, values and shape.

    A tensor ``NAME`` with at most ``max_density`` non-zero entries becomes ``NAME.coo_indices``
    (int32, ``(ndim, nnz)``), ``NAME.coo_values`` (its dtype, ``(nnz,)``) and ``NAME.coo_shape``
    (int64); every entry is kept exactly (the importer rebuilds the dense tensor)."""
    import torch

    out = {}
    for name, t in state.items():
        if ".U_matrix_" in name and t.numel() > 64:
            nz = t != 0
            if int(nz.sum()) <= max_density * t.numel():
                idx = nz.nonzero().T.contiguous()
                out[name + ".coo_indices"] = idx.to(torch.int32)
                out[name + ".coo_values"] = t[nz].contiguous()
                out[name + ".coo_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
                continue
        out[name] = t
    return out


def load_mace_model(path):
    import torch

    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except RuntimeError:
        model = torch.jit.load(path, map_location="cpu")
    if isinstance(model, dict) and "model" in model:
        model = model["model"]
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="mace-torch model file (torch.save of the model, as mace_run_train writes)")
    p.add_argument("out", help="output folder (hyperparameters.json + weights.safetensors)")
    args = p.parse_args(argv)
    try:
        model = load_mace_model(args.model)
        out = export(model, args.out)
    except UnsupportedMaceModel as exc:
        print(f"export_mace: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'hyperparameters.json'} and {out / 'weights.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
