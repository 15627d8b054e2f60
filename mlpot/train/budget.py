"""Schedules placed on a wall-clock budget (``training.time_limit``).

A run of ``epochs`` epochs places its fractional schedules on the epoch axis: stage two starts
at epoch ``int(s * epochs) + 1`` for ``stage_two.start = s``, the cosine LR reaches its minimum
at ``t_max = epochs``, early stopping waits ``patience`` epochs. When a time limit is set and the
configured epochs do not fit in it, those positions are nonsense (a 12-minute run of a
1500-epoch config never reaches stage two). This module replaces ``epochs`` by the number of
epochs the budget holds,

    N(t) = min(epochs, n_done + floor((B - t) / tau)),

with ``B`` the budget (s), ``t`` the time used so far and ``tau`` the measured wall time of one
epoch (training + validation; the mean over the complete epochs of this invocation). ``N`` is
re-estimated at every epoch boundary, so a machine that slows down moves the schedule earlier.
Then

* a fractional stage-two start ``s`` is epoch ``int(s * N) + 1`` (checked at epoch
  boundaries), or, between batches, the moment the run's position in epochs passes ``s`` times
  the epochs the budget holds (:meth:`TimeBudget.stage_two_due`; for budgets of a few epochs); an epoch start ``k > N`` (out
  of reach) becomes the fraction ``k / epochs`` of ``N``. Since ``int(s * N) + 1 <= N`` for
  ``s < 1``, stage two always starts no later than the last complete epoch the budget holds, so
  a time-limited run ends with its energy stage done;
* cosine annealing without an explicit ``t_max`` anneals over ``N`` epochs (closed form
  ``lr = eta_min + (lr0 - eta_min) (1 + cos(pi e / N)) / 2``);
* early-stopping patience ``p`` becomes ``max(eval_every, ceil(p * N / epochs))`` epochs.

When everything fits (``N == epochs``) every position equals the unbudgeted one, exactly.
"""
from __future__ import annotations

import math

__all__ = ["TimeBudget", "stage_two_epoch", "cosine_lr"]


def stage_two_epoch(start, epochs: int, planned: int | None = None) -> int:
    """First epoch of stage two for ``stage_two.start`` (a fraction in (0, 1) or an epoch >= 1),
    with ``epochs`` configured and ``planned`` the epochs the budget holds (None: no budget)."""
    total = epochs if planned is None else min(epochs, planned)
    if isinstance(start, float):
        return int(start * total) + 1
    start = int(start)
    if start <= total or planned is None:
        return start
    return int(min(start / epochs, 1.0 - 1e-12) * total) + 1


def cosine_lr(lr0: float, eta_min: float, epoch: int, t_max: int) -> float:
    """Cosine annealing in closed form: ``eta_min + (lr0 - eta_min) (1 + cos(pi e / T)) / 2``."""
    e = min(epoch, t_max)
    return eta_min + (lr0 - eta_min) * (1.0 + math.cos(math.pi * e / t_max)) / 2.0


class TimeBudget:
    """The epochs a wall-clock budget holds, from measured epoch times (see module docstring).

    ``minutes``: the budget of this invocation; ``epochs``: configured epochs; ``done_before``:
    epochs completed before this invocation (resume)."""

    def __init__(self, minutes: float, epochs: int, done_before: int = 0):
        self.seconds = 60.0 * float(minutes)
        self.epochs = int(epochs)
        self.done_before = int(done_before)
        self.epoch_times: list[float] = []

    def record_epoch(self, seconds: float) -> None:
        """Wall time of one complete epoch (training + validation) of this invocation."""
        self.epoch_times.append(float(seconds))

    @property
    def seconds_per_epoch(self) -> float | None:
        return sum(self.epoch_times) / len(self.epoch_times) if self.epoch_times else None

    def planned_epochs(self, elapsed: float) -> int | None:
        """``N(t)``: the total epochs of the run (all invocations) the budget holds, at most the
        configured ``epochs``; None before the first epoch was measured."""
        tau = self.seconds_per_epoch
        if tau is None:
            return None
        done = self.done_before + len(self.epoch_times)
        fit = int(max(self.seconds - elapsed, 0.0) // tau) if tau > 0 else self.epochs
        return min(self.epochs, done + fit)

    def binding(self, elapsed: float) -> bool:
        """True when the budget ends the run before the configured epochs."""
        n = self.planned_epochs(elapsed)
        return n is not None and n < self.epochs

    def patience(self, patience: int, elapsed: float, eval_every: int = 1) -> int:
        """Early-stopping patience as the same share of the budgeted run as of ``epochs``."""
        n = self.planned_epochs(elapsed)
        if n is None or n >= self.epochs:
            return patience
        return max(eval_every, math.ceil(patience * n / self.epochs))

    def stage_two_due(self, start, elapsed: float, progress: float) -> str | None:
        """Within an epoch: why stage two starts now (None: not yet). ``progress`` is the epochs
        done in this invocation, with the current one counted by its finished batches. With
        ``tau = elapsed / progress`` the run holds ``N = done_before + progress + (B - t) / tau``
        epochs; stage two is due once ``done_before + progress >= s N`` (an epoch start ``k``
        out of reach: ``s = k / epochs``), and only when ``N < epochs``. This catches budgets
        that hold few (or less than one) epochs, where an epoch boundary comes too late."""
        if progress <= 0 or elapsed <= 0:
            return None
        tau = elapsed / progress
        position = self.done_before + progress
        n = position + max(self.seconds - elapsed, 0.0) / tau
        if n >= self.epochs:
            return None
        s = float(start) if isinstance(start, float) else int(start) / self.epochs
        if isinstance(start, int) and start <= n:
            return None  # the given epoch is within reach: the caller starts it there
        if position < min(s, 1.0) * n:
            return None
        what = f"{start:g} of the run" if isinstance(start, float) else f"epoch {start} of {self.epochs}"
        return (f"time budget: {elapsed / 60:.1f} of {self.seconds / 60:g} min used; at {tau:.1f} s/epoch "
                f"(measured) the budget holds {n:.1f} of the {self.epochs} configured epochs, and "
                f"stage_two.start ({what}) is reached within epoch {math.floor(position) + 1}")

    def stage_two_reason(self, start, epoch: int, elapsed: float) -> str | None:
        """Why stage two starts at ``epoch`` on the budget (None: not yet). Only answers when the
        budget binds; the configured epoch position is checked by the caller."""
        n = self.planned_epochs(elapsed)
        if n is None or n >= self.epochs:
            return None
        first = stage_two_epoch(start, self.epochs, n)
        if epoch < first:
            return None
        what = f"{start:g} of the run" if isinstance(start, float) else f"epoch {start} of {self.epochs}"
        return (f"time budget: {elapsed / 60:.1f} of {self.seconds / 60:g} min used; at "
                f"{self.seconds_per_epoch:.1f} s/epoch (measured) the budget holds {n} of the "
                f"{self.epochs} configured epochs, and stage_two.start ({what}) is epoch {first} of them")
