"""Errors of a model on a dataset: MAE and RMSE per config_type, and the validation loss.

Units of the reported metrics (what MACE users read):

* ``e_mae``, ``e_rmse``: energy per atom, meV/atom (``|E_pred - E_ref| / N``, over structures);
* ``f_mae``, ``f_rmse``: force components, meV/Å (over all atoms and the 3 components);
* ``s_mae``, ``s_rmse``: stress components, meV/Å^3 (over structures and the 9 components),
  only when the data has stress;
* ``h_mae``, ``h_rmse``: Hessian entries, eV/Å² (over every structure's :math:`(3n, 3n)` block),
  only when the data has Hessians and the model predicts them (a HIP head, :mod:`mlpot.models.hip`).

Only structures whose target is present (its weight ``energy_weight`` / ``forces_weight`` /
``stress_weight`` is non-zero) enter that target's errors. Sums are kept per config_type and
merged exactly across data-parallel ranks.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

__all__ = ["ErrorAccumulator", "evaluate_loader", "format_table", "METRIC_KEYS"]

METRIC_KEYS = ("e_mae", "e_rmse", "f_mae", "f_rmse", "s_mae", "s_rmse", "h_mae", "h_rmse")
_FIELDS = ("e_abs", "e_sq", "e_n", "f_abs", "f_sq", "f_n", "s_abs", "s_sq", "s_n", "h_abs", "h_sq", "h_n",
           "n_configs")


class ErrorAccumulator:
    """Sums of absolute and squared errors, by config_type (see the module doc)."""

    def __init__(self):
        self.sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(_FIELDS, 0.0))
        self.loss_sums = {"energy": 0.0, "forces": 0.0, "stress": 0.0, "hessian": 0.0}
        self.loss_counts = {"energy": 0, "forces": 0, "stress": 0, "hessian": 0}

    def add(self, pred: dict, graph: dict) -> None:
        ct = graph["config_type"]
        n_atoms = graph["num_atoms"].detach().cpu().numpy()
        B = len(n_atoms)
        e_err = f_err = s_err = None
        if "energy" in graph:
            mask = (graph["energy_weight"] != 0).cpu().numpy()
            e = ((pred["energy"] - graph["energy"]).detach().cpu().numpy() / n_atoms) * 1000.0
            e_err = (e, mask)
        if "forces" in graph and "forces" in pred:
            mask = (graph["forces_weight"] != 0).cpu().numpy()
            f = (pred["forces"] - graph["forces"]).detach().cpu().numpy() * 1000.0
            ptr = graph["ptr"].cpu().numpy()
            f_err = (f, ptr, mask)
        if "stress" in graph and "stress" in pred:
            mask = (graph["stress_weight"] != 0).cpu().numpy()
            s = (pred["stress"] - graph["stress"]).detach().cpu().numpy() * 1000.0
            s_err = (s, mask)
        h_err = None
        if "hessian" in graph and "hessian" in pred:
            from mlpot.train.losses import hessian_errors

            diff, owner = hessian_errors(pred, graph)
            diff, owner = diff.detach().cpu().numpy(), owner.cpu().numpy()
            mask = (graph["hessian_weight"] != 0).cpu().numpy()
            h_err = (np.abs(diff), diff * diff, owner, mask)
        for b in range(B):
            acc = self.sums[ct[b]]
            if h_err is not None and h_err[3][b]:
                sel = h_err[2] == b
                acc["h_abs"] += float(h_err[0][sel].sum())
                acc["h_sq"] += float(h_err[1][sel].sum())
                acc["h_n"] += int(sel.sum())
            acc["n_configs"] += 1
            if e_err is not None and e_err[1][b]:
                x = e_err[0][b]
                acc["e_abs"] += abs(x)
                acc["e_sq"] += x * x
                acc["e_n"] += 1
            if f_err is not None and f_err[2][b]:
                x = f_err[0][f_err[1][b] : f_err[1][b + 1]]
                acc["f_abs"] += float(np.abs(x).sum())
                acc["f_sq"] += float((x * x).sum())
                acc["f_n"] += x.size
            if s_err is not None and s_err[1][b]:
                x = s_err[0][b]
                acc["s_abs"] += float(np.abs(x).sum())
                acc["s_sq"] += float((x * x).sum())
                acc["s_n"] += x.size

    def add_loss_terms(self, terms: dict) -> None:
        for name, (value, count) in terms.items():
            self.loss_sums[name] += float(value.detach())
            self.loss_counts[name] += int(count)

    # ---- merging across ranks --------------------------------------------------------------
    def state(self) -> dict:
        return {"sums": {k: dict(v) for k, v in self.sums.items()},
                "loss_sums": dict(self.loss_sums), "loss_counts": dict(self.loss_counts)}

    @classmethod
    def merged(cls, states: list[dict]) -> ErrorAccumulator:
        out = cls()
        for st in states:
            for ct, vals in st["sums"].items():
                acc = out.sums[ct]
                for k, v in vals.items():
                    acc[k] += v
            for k in out.loss_sums:
                out.loss_sums[k] += st["loss_sums"][k]
                out.loss_counts[k] += st["loss_counts"][k]
        return out

    # ---- results ----------------------------------------------------------------------------
    def loss(self, loss_fn) -> float:
        lambdas = {"energy": loss_fn.energy_weight, "forces": loss_fn.forces_weight,
                   "stress": loss_fn.stress_weight, "hessian": getattr(loss_fn, "hessian_weight", 0.0)}
        total = 0.0
        for k, lam in lambdas.items():
            if self.loss_counts[k]:
                total += lam * self.loss_sums[k] / self.loss_counts[k]
        return total

    @staticmethod
    def _finish(acc: dict) -> dict:
        out: dict = {}
        for p in ("e", "f", "s", "h"):
            n = acc[f"{p}_n"]
            if n:
                out[f"{p}_mae"] = acc[f"{p}_abs"] / n
                out[f"{p}_rmse"] = math.sqrt(acc[f"{p}_sq"] / n)
        out["n_configs"] = int(acc["n_configs"])
        return out

    def metrics(self) -> dict:
        total = dict.fromkeys(_FIELDS, 0.0)
        for acc in self.sums.values():
            for k, v in acc.items():
                total[k] += v
        out = self._finish(total)
        out["by_config_type"] = {ct: self._finish(acc) for ct, acc in sorted(self.sums.items())}
        return out


def _to_device(graph: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in graph.items()}


def evaluate_loader(model, loader, device, loss_fn=None, info=None, predictions: list | None = None) -> dict:
    """Run ``model`` over ``loader``; returns metrics (plus ``loss`` when ``loss_fn`` is given).

    With ``info`` (a :class:`~mlpot.train.distributed.DistInfo`) the sums are merged over
    ranks. ``predictions``, when a list, receives per-structure dicts (energy eV,
    forces eV/Å, stress 3x3 eV/Å^3) in loader order.
    """
    from mlpot.train.distributed import gather_objects

    was_training = model.training
    model.eval()
    acc = ErrorAccumulator()
    try:
        for graph in loader:
            graph = _to_device(graph, device)
            want_stress = "stress" in graph and bool((graph["stress_weight"] != 0).any())
            if predictions is not None:  # predictions: stress of every periodic cell
                want_stress = want_stress or bool(graph["pbc"].all(dim=1).any())
            want_hessian = "hessian" in graph and getattr(model, "hessian_head", None) is not None
            with torch.enable_grad():
                out = model(graph, compute_force=True, compute_stress=want_stress, create_graph=False,
                            **({"compute_hessian": True, "hessian_method": "direct"} if want_hessian else {}))
            acc.add(out, graph)
            if loss_fn is not None:
                acc.add_loss_terms(loss_fn.terms(out, graph))
            if predictions is not None:
                ptr = graph["ptr"].cpu().numpy()
                e = out["energy"].detach().cpu().numpy()
                f = out["forces"].detach().cpu().numpy()
                s = out["stress"].detach().cpu().numpy() if "stress" in out else None
                for b in range(len(e)):
                    predictions.append({
                        "energy": float(e[b]), "forces": f[ptr[b] : ptr[b + 1]],
                        "stress": None if s is None or not bool(graph["pbc"][b].all()) else s[b],
                    })
    finally:
        model.train(was_training)
    if info is not None and info.enabled:
        acc = ErrorAccumulator.merged(gather_objects(acc.state(), info))
    result = acc.metrics()
    if loss_fn is not None:
        result["loss"] = acc.loss(loss_fn)
    return result


def format_table(metrics: dict[str, dict], by_config_type: bool = True) -> str:
    """A plain-text table: one row per split (and per config_type under it)."""
    has_s = any("s_mae" in m for m in metrics.values())
    cols = ["E MAE", "E RMSE", "F MAE", "F RMSE"] + (["S MAE", "S RMSE"] if has_s else [])
    keys = ["e_mae", "e_rmse", "f_mae", "f_rmse"] + (["s_mae", "s_rmse"] if has_s else [])
    has_h = any("h_mae" in m for m in metrics.values())
    cols += ["H MAE", "H RMSE"] if has_h else []
    keys += ["h_mae", "h_rmse"] if has_h else []
    rows = []
    for split, m in metrics.items():
        rows.append((split, m))
        if by_config_type and len(m.get("by_config_type", {})) > 1:
            for ct, mm in m["by_config_type"].items():
                rows.append((f"  {ct}", mm))
    width = max([len("split / config_type")] + [len(r[0]) for r in rows]) + 2
    units = "E: meV/atom  F: meV/Å" + ("  S: meV/Å^3" if has_s else "") + ("  H: eV/Å^2" if has_h else "")
    lines = [units, "split / config_type".ljust(width) + "".join(c.rjust(10) for c in cols) + "N".rjust(8)]
    lines.append("-" * len(lines[-1]))
    for name, m in rows:
        vals = "".join((f"{m[k]:10.2f}" if k in m else "-".rjust(10)) for k in keys)
        lines.append(name.ljust(width) + vals + str(m.get("n_configs", "")).rjust(8))
    return "\n".join(lines)
