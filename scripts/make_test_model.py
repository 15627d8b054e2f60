"""Train the small test model `tests/fixtures/models/emt_cu_mace.pt` (40 epochs, about a minute on 2 cores).

A MACE with hidden irreps ``8x0e + 8x1o``, ``max_ell 2``, correlation 2, one interaction,
``r_max 4.5`` Å, fitted to energies and forces of fcc Cu cells labelled by ASE's EMT
(:func:`mlpot.data.synthetic.emt_structures`, system "cu"). The model is trained in float64
with a plain Adam loop (loss: energy per atom squared error + mean squared force error), E0
set to the mean energy per atom of the training set. Deterministic given ``--seed``.

The MD and relaxation tests use it as a smooth, physically sensible Cu potential; it is not
meant to be accurate. Its file stays well below 1 MB.

    python scripts/make_test_model.py [--out tests/fixtures/models/emt_cu_mace.pt] [--max-epochs 40]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

HYPER = dict(
    r_max=4.5,
    num_bessel=6,
    num_polynomial_cutoff=5,
    max_ell=2,
    num_interactions=1,
    hidden_irreps="8x0e + 8x1o",
    MLP_irreps="8x0e",
    correlation=2,
    radial_MLP=[16, 16],
    avg_num_neighbors=12.0,
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "models" / "emt_cu_mace.pt"))
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--seconds", type=float, default=600.0, help="training time limit (stops early)")
    p.add_argument("--max-epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from mlpot.data.graph import atoms_to_graph, collate
    from mlpot.data.synthetic import emt_structures
    from mlpot.models import build_model

    torch.manual_seed(args.seed)
    frames = emt_structures(args.n_train + 30, seed=args.seed, system="cu")
    train, valid = frames[: args.n_train], frames[args.n_train:]
    e_per_atom = np.mean([a.info["REF_energy"] / len(a) for a in train])
    model = build_model("MACE", atomic_numbers=[29], e0s={29: float(e_per_atom)}, **HYPER).double()

    def batches(data, size, shuffle):
        order = np.random.default_rng(len(data)).permutation(len(data)) if shuffle else np.arange(len(data))
        for k in range(0, len(data), size):
            chunk = [data[i] for i in order[k:k + size]]
            yield collate([atoms_to_graph(a, model.r_max, dtype=torch.float64, energy_key="REF_energy",
                                          forces_key="REF_forces", stress_key="REF_stress") for a in chunk])

    train_graphs = list(batches(train, 8, False))

    def loss_fn(g, create_graph):
        out = model(g, compute_force=True, create_graph=create_graph)
        n = g["num_atoms"].to(torch.float64)
        le = (((out["energy"] - g["energy"]) / n) ** 2).mean()
        lf = ((out["forces"] - g["forces"]) ** 2).mean()
        return le, lf

    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
    t0 = time.perf_counter()
    epoch = 0
    while epoch < args.max_epochs and time.perf_counter() - t0 < args.seconds:
        model.train()
        for g in train_graphs:
            opt.zero_grad()
            le, lf = loss_fn(g, True)
            (le * 10.0 + lf).backward()
            opt.step()
        sched.step()
        epoch += 1
    model.eval()
    e_err, f_err = [], []
    for g in batches(valid, 10, False):
        out = model(g, compute_force=True)
        e_err.append(((out["energy"] - g["energy"]) / g["num_atoms"]).detach().abs().numpy())
        f_err.append((out["forces"] - g["forces"]).detach().abs().numpy().ravel())
    e_mae, f_mae = 1000 * np.concatenate(e_err).mean(), 1000 * np.concatenate(f_err).mean()
    model.metadata = {"trained_on": "EMT fcc Cu (mlpot.data.synthetic, system cu)", "epochs": epoch,
                      "valid_energy_mae_meV_per_atom": float(e_mae), "valid_forces_mae_meV_per_A": float(f_mae),
                      "made_by": "scripts/make_test_model.py"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    print(f"{epoch} epochs in {time.perf_counter() - t0:.0f} s; valid MAE: E {e_mae:.2f} meV/atom, "
          f"F {f_mae:.1f} meV/Å; wrote {out} ({out.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
