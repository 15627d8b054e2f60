"""Watching a committee's uncertainty during MD.

After every step, :class:`UncertaintyWatch` reads ``max_force_std`` (the largest per-atom
committee force standard deviation, :mod:`mlpot.calculators.committee`) from the calculator's
results of the current positions (no extra evaluation). Above the threshold it either stops the
run (``"stop"``: raises :class:`UncertaintyWatch.Exceeded` naming the step and the value) or
writes ``# uncertain step N max_force_std X`` into the MD log and keeps going (``"flag"``).
"""
from __future__ import annotations

__all__ = ["UncertaintyWatch"]


class UncertaintyWatch:
    class Exceeded(Exception):
        """The committee force spread passed the threshold (mode "stop")."""

    def __init__(self, atoms, dyn, threshold: float, mode: str, logfile=None, flagged: list | None = None):
        if mode not in ("stop", "flag"):
            raise ValueError(f"mode must be 'stop' or 'flag', got {mode!r}")
        self.atoms, self.dyn, self.threshold, self.mode = atoms, dyn, float(threshold), mode
        self.logfile = logfile
        self.flagged = [] if flagged is None else flagged

    def __call__(self) -> None:
        calc = self.atoms.calc
        if "max_force_std" not in calc.results:
            calc.get_forces(self.atoms)
        value = float(calc.results["max_force_std"])
        if value <= self.threshold:
            return
        step = int(self.dyn.nsteps)
        if self.mode == "stop":
            raise UncertaintyWatch.Exceeded(
                f"committee force std {value:.4g} eV/Å > threshold {self.threshold} eV/Å at step {step}")
        self.flagged.append((step, value))
        if self.logfile is not None:
            self.logfile.write(f"# uncertain step {step} max_force_std {value:.6g}\n")
