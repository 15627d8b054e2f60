r"""Training losses on energies (per atom), forces and stress.

For a batch with structures :math:`b` (``N_b`` atoms, config weight :math:`w_b`, target
weights :math:`w^E_b, w^F_b, w^S_b`, 0 where a target is absent) and elementwise penalty
:math:`\rho`:

.. math::

    L = \lambda_E \frac{1}{B}\sum_b w_b w^E_b \rho\Big(\frac{\hat E_b - E_b}{N_b}\Big)
      + \lambda_F \frac{1}{3N}\sum_{i} w_{b(i)} w^F_{b(i)} \sum_\alpha \rho(\hat F_{i\alpha} - F_{i\alpha})
      + \lambda_S \frac{1}{9B}\sum_b w_b w^S_b \sum_{\alpha\beta} \rho(\hat\sigma_{b\alpha\beta} - \sigma_{b\alpha\beta})
      + \lambda_H \frac{1}{\sum_b 9 N_b^2}\sum_b w_b w^H_b \sum_{kl} \rho(\hat H_{b,kl} - H_{b,kl})

* ``mse``: :math:`\rho(x) = x^2` (mace-torch's weighted energy/forces/stress loss).
* ``huber``: :math:`\rho` = Huber with threshold :math:`\delta` (quadratic below, linear above).
* ``universal`` (mace-torch's loss for foundation models): Huber for energy and stress; for
  forces the threshold shrinks with the size of the reference force on the atom,
  :math:`\delta_i = \delta\cdot c(|F_i|)` with :math:`c = 1, 0.7, 0.4, 0.1` for
  :math:`|F_i| < 100, < 200, < 300, \ge 300` eV/Å, so the very large forces of
  high-energy structures count linearly early on.

Here the config and target weights multiply the elementwise penalty (mace-torch multiplies
the values inside the Huber function for ``universal``; the two agree when the weights are 0
or 1).

**Data-parallel reduction.** Every mean above is taken over the *global* batch (all ranks):
each rank sums its own terms and divides by the global count (obtained with one
``all_reduce``). Gradients are then *summed* over ranks (see :mod:`mlpot.train.distributed`),
so a step on ``R`` ranks with ``b`` structures each equals a step on one process with
``R b`` structures.
"""
from __future__ import annotations

import torch

__all__ = ["WeightedLoss", "LOSSES", "huber", "conditional_huber_forces", "hessian_errors", "hessian_term"]

LOSSES = ("mse", "huber", "universal")


def huber(x: torch.Tensor, delta) -> torch.Tensor:
    """Elementwise Huber penalty: ``x^2 / 2`` for ``|x| <= delta``, ``delta (|x| - delta / 2)`` above.

    ``delta`` may be a tensor broadcastable to ``x``.
    """
    a = x.abs()
    delta = torch.as_tensor(delta, dtype=x.dtype, device=x.device)
    return torch.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def force_huber_thresholds(ref_forces: torch.Tensor, delta: float) -> torch.Tensor:
    """Per-atom Huber thresholds of the universal loss, ``delta * c(|F_ref|)`` (N, 1)."""
    norm = torch.linalg.vector_norm(ref_forces, dim=-1)
    factor = torch.full_like(norm, 0.1)
    factor = torch.where(norm < 300.0, torch.full_like(norm, 0.4), factor)
    factor = torch.where(norm < 200.0, torch.full_like(norm, 0.7), factor)
    factor = torch.where(norm < 100.0, torch.ones_like(norm), factor)
    return (delta * factor)[:, None]


def conditional_huber_forces(pred: torch.Tensor, ref: torch.Tensor, delta: float) -> torch.Tensor:
    """Elementwise universal-loss force penalty (N, 3)."""
    return huber(pred - ref, force_huber_thresholds(ref, delta))


def hessian_errors(pred: dict, graph: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry-wise errors of the predicted Hessian against the flat per-structure reference
    (:mod:`mlpot.models.hessian`) and the structure index of each entry."""
    from mlpot.models.hessian import hessian_block_index

    n = graph["num_atoms"]
    diff = pred["hessian"].reshape(-1)[hessian_block_index(n)] - graph["hessian"]
    owner = torch.repeat_interleave(torch.arange(n.shape[0], device=n.device), (3 * n) ** 2)
    return diff, owner


def hessian_term(pred: dict, graph: dict, rho) -> tuple[torch.Tensor, int]:
    r""":math:`\sum_b w_b w^H_b \sum_{kl} \rho(\hat H_{b,kl} - H_{b,kl})` over the entries of
    every structure's :math:`(3n_b, 3n_b)` Hessian, and the number of entries."""
    diff, owner = hessian_errors(pred, graph)
    w = (graph["weight"] * graph["hessian_weight"])[owner]
    return (w * rho(diff)).sum(), int(diff.numel())


class WeightedLoss:
    """Weighted energy / forces / stress loss (see the module doc).

    ``__call__(pred, graph, world_size=1, group=None)`` returns ``(loss, parts)``: the loss of
    this rank's share (its sums over the global counts; summed over ranks it is the global
    loss) and the parts ``{"energy", "forces", "stress"}`` (before the lambdas) as floats,
    on the same footing.
    """

    def __init__(self, kind: str = "mse", energy_weight: float = 1.0, forces_weight: float = 100.0,
                 stress_weight: float = 1.0, huber_delta: float = 0.01, hessian_weight: float = 0.0):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")
        self.kind = kind
        self.energy_weight = float(energy_weight)
        self.forces_weight = float(forces_weight)
        self.stress_weight = float(stress_weight)
        self.huber_delta = float(huber_delta)
        self.hessian_weight = float(hessian_weight)

    def _rho(self, x):
        if self.kind == "mse":
            return x * x
        return huber(x, self.huber_delta)

    def terms(self, pred: dict, graph: dict) -> dict[str, tuple[torch.Tensor, int]]:
        """Local sums and counts ``{name: (sum, count)}`` before global normalisation."""
        out = {}
        w = graph["weight"]
        n_atoms = graph["num_atoms"].to(w.dtype)
        if self.energy_weight and "energy" in graph:
            err = (pred["energy"] - graph["energy"]) / n_atoms
            out["energy"] = ((w * graph["energy_weight"] * self._rho(err)).sum(), int(err.numel()))
        if self.forces_weight and "forces" in graph and "forces" in pred:
            wa = (w * graph["forces_weight"])[graph["batch"]][:, None]
            diff = pred["forces"] - graph["forces"]
            if self.kind == "universal":
                rho = conditional_huber_forces(pred["forces"], graph["forces"], self.huber_delta)
            else:
                rho = self._rho(diff)
            out["forces"] = ((wa * rho).sum(), int(diff.numel()))
        if self.stress_weight and "stress" in graph and "stress" in pred:
            ws = (w * graph["stress_weight"])[:, None, None]
            diff = pred["stress"] - graph["stress"]
            out["stress"] = ((ws * self._rho(diff)).sum(), int(diff.numel()))
        if self.hessian_weight and "hessian" in graph and "hessian" in pred:
            out["hessian"] = hessian_term(pred, graph, self._rho)
        return out

    def __call__(self, pred: dict, graph: dict, world_size: int = 1, group=None):
        terms = self.terms(pred, graph)
        names = ("energy", "forces", "stress", "hessian")
        counts = [terms[n][1] if n in terms else 0 for n in names]
        if world_size > 1:
            import torch.distributed as dist

            t = torch.tensor(counts, dtype=torch.float64)
            if dist.get_backend(group) == "nccl":
                t = t.cuda()
            dist.all_reduce(t, group=group)
            counts = [int(round(c)) for c in t.cpu().tolist()]
        lambdas = {"energy": self.energy_weight, "forces": self.forces_weight, "stress": self.stress_weight,
                   "hessian": self.hessian_weight}
        dtype = graph["positions"].dtype
        total = torch.zeros((), dtype=dtype, device=graph["positions"].device)
        parts = {}
        for name, count in zip(names, counts):
            if name not in terms or count == 0:
                # keep every parameter in the graph on every rank (zero contribution)
                continue
            value = terms[name][0] / count
            parts[name] = float(value.detach())
            total = total + lambdas[name] * value
        return total, parts
