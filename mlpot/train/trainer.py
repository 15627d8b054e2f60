"""The training loop: one function, :func:`train`, driven by a validated config.

Per epoch: shuffle with a generator seeded by ``(seed, epoch)`` (a
:class:`~torch.utils.data.DistributedSampler`, also for one process), for each batch compute
energies, forces (and stress) with ``create_graph=True``, the weighted loss of
:mod:`mlpot.train.losses`, backward, sum gradients over ranks, clip, step, update the EMA.
Then validate with the EMA weights, step the LR scheduler, keep the best model (lowest
validation loss), stop early after ``patience`` epochs without improvement, write
``log.csv`` and, every ``checkpoint_every`` epochs, an atomic checkpoint.

Stage two (mace-torch's "SWA" stage): from ``stage_two.start`` the loss weights and the
learning rate switch to the stage-two values and the LR scheduler stops. The best-model
bookkeeping restarts (losses with other weights are not comparable), so the final model comes
from stage two. Early stopping in stage one jumps to stage two when one is configured.

Resume (``--resume``) restores model, optimizer, scheduler, EMA, RNG states (python, numpy,
torch), epoch, stage and best-so-far from ``<output>/checkpoint.pt``; since the data order
only depends on ``(seed, epoch)``, the resumed run reproduces an uninterrupted one.
``time_limit`` (minutes, per invocation) stops cleanly between batches; the last complete
epoch's checkpoint stays on disk, the best model is kept and evaluated.

Safety: the output folder is locked for the whole run (:mod:`mlpot.train.runlock`); stale
temporary files of killed writers are removed at start-up. Training stops at the first
non-finite loss or gradient norm (before the optimizer step, so no NaN reaches the weights),
naming the epoch, the batch and its frames (file and index); ``model.pt`` then holds the
best model so far (when there is one) and the run fails with
:class:`~mlpot.errors.NonFiniteError`. Checkpoints are read with ``weights_only=True`` and
an explicit allow-list (:func:`_numpy_rng_globals`): a checkpoint cannot run code.
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mlpot.errors import ConfigError, NonFiniteError
from mlpot.fileio import atomic_write_text, remove_stale_temps
from mlpot.models.io import atomic_torch_save
from mlpot.train import distributed as ddp
from mlpot.train.config import dump_config
from mlpot.train.ema import ExponentialMovingAverage
from mlpot.train.losses import WeightedLoss
from mlpot.train.metrics import evaluate_loader, format_table

__all__ = ["train", "Trainer"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
CHECKPOINT = "checkpoint.pt"
#: files the run writes into its folder (their stale temporaries are removed at start-up)
RUN_FILES = (CHECKPOINT, "model.pt", "config.yaml", "log.csv", "metrics.json", "learning_curve.png")


def _numpy_rng_globals() -> list:
    """The allow-list beyond torch's defaults: what unpickling ``np.random.get_state()`` (a
    uint32 array in a tuple) and numpy scalars in the history need. Each of these rebuilds a
    plain array, scalar or dtype from bytes; none calls arbitrary code."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.bool_)]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtypes]


def load_checkpoint_file(path: Path) -> dict:
    """``torch.load(weights_only=True)`` of a training checkpoint; anything outside the
    allow-list (tensors, containers, numbers, strings and the numpy RNG state) is refused, so a
    crafted pickle runs nothing. Unreadable or truncated files are a ConfigError."""
    import pickle

    from mlpot.models.io import load_error_text

    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{path}: refusing to load the checkpoint ({load_error_text(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt / not a torch file
        raise ConfigError(
            f"{path}: cannot read the checkpoint (truncated or corrupt?): {load_error_text(exc)}; "
            "delete it or start without --resume"
        ) from None
    return state


def _sources(frames) -> list[str]:
    out = []
    for a in frames:
        src = a.info.get("_mlpot_source")
        out.append(f"{src[0]} frame {src[1]}" if src else f"{a.get_chemical_formula()} (no file)")
    return out


def _resolve_device(name: str, info: ddp.DistInfo) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key `device` is 'cuda' but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
    return torch.device("cpu")


class _StridedSampler(torch.utils.data.Sampler):
    """Frames ``rank, rank + R, ...`` in order (evaluation shards; no padding)."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


class Trainer:
    def __init__(self, cfg: dict, resume: bool = False, log=None):
        self.cfg = cfg
        self.tr = cfg["training"]
        self.resume = resume
        self.info = ddp.setup(cfg["device"])
        self.out = Path(cfg["output"])
        self._log = log or (lambda msg: print(msg, flush=True))
        self.device = _resolve_device(cfg["device"], self.info)
        self.dtype = _DTYPES[cfg["dtype"]]

    # ---- helpers ----------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.info.is_main:
            self._log(msg)

    def _barrier(self):
        if self.info.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ---- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        from mlpot.data import AtomicDataset, make_dataloader
        from mlpot.models.base import build_model
        from mlpot.train.lazy_data import prepare_lazy_data
        from mlpot.train.setup import prepare_data, resolve_model_config

        cfg, tr = self.cfg, self.tr
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                for p in remove_stale_temps(self.out, name):
                    self.log(f"removed a stale temporary file {p}")
            if cfg["data"]["synthetic"] is not None:
                from mlpot.train.setup import synthetic_paths

                synthetic_paths(cfg)  # rank 0 writes the files, the others wait and read them
        self._barrier()
        self._seed_everything(cfg["seed"])
        t0 = time.perf_counter()
        self.splits = prepare_lazy_data(cfg) or prepare_data(cfg)  # HDF5 datasets stay on disk
        self.finetune = None
        if cfg["model"].get("init_from") is not None:  # fine-tuning (mlpot.train.finetune)
            from mlpot.train.finetune import prepare_finetune

            self.finetune = prepare_finetune(cfg, self.splits, self.log)
            name, kwargs, stats = self.finetune.name, self.finetune.kwargs, self.finetune.statistics
        else:
            name, kwargs, stats = resolve_model_config(cfg, self.splits)
        self.statistics = stats
        self.model_name, self.model_kwargs = name, kwargs
        torch.manual_seed(cfg["seed"])
        try:
            model = self.finetune.model if self.finetune is not None else build_model(name, **kwargs)
        except (ValueError, TypeError, AssertionError, KeyError, IndexError) as exc:
            if isinstance(exc, ConfigError):
                raise
            msg = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(f"config section `model`: cannot build {name}: {msg}") from None
        self.model = model.to(device=self.device, dtype=self.dtype)
        if tr.get("freeze"):  # fine-tuning: fixed parameters stay out of the optimizer
            from mlpot.train.finetune import apply_freeze

            n_frozen = apply_freeze(self.model, tr["freeze"])
            self.log(f"frozen: {n_frozen} parameters under {', '.join(tr['freeze'])}")
        self.replay = None
        if self.finetune is not None:  # multi-head replay fine-tuning: on whenever `finetune.head` is set
            from mlpot.train.finetune import make_replay

            self.replay = make_replay(cfg, self.model, self.dtype, self.log)
        ddp.broadcast_parameters(self.model, self.info)
        self.log(
            f"data: {len(self.splits.train)} train, {len(self.splits.valid)} valid, "
            + ", ".join(f"{len(v)} {k}" for k, v in self.splits.tests.items())
            + f" structures ({time.perf_counter() - t0:.1f} s)"
        )
        self.log(
            f"model: {name}, {sum(p.numel() for p in self.model.parameters())} parameters, "
            f"r_max {kwargs['r_max']} Å, avg_num_neighbors {kwargs.get('avg_num_neighbors', '-')}, "
            f"E0s {kwargs['e0s']}, scale {kwargs.get('scale', '-')}, shift {kwargs.get('shift', '-')}"
        )
        if stats.get("e0s_note"):
            self.log(stats["e0s_note"])
        if self.info.is_main:
            resolved = dict(cfg)
            resolved["model"] = {"name": name, **kwargs}
            dump_config(resolved, self.out / "config.yaml")

        r_max = float(kwargs["r_max"])
        # lists of Atoms are built into graphs once; lazy HDF5 splits (mlpot.train.lazy_data) stay on disk
        def _graphs(frames):
            return AtomicDataset(frames, r_max, self.dtype, precompute=True) if isinstance(frames, list) else frames

        self.train_set = _graphs(self.splits.train)
        self.valid_set = _graphs(self.splits.valid) if self.splits.valid else None
        self.sampler = torch.utils.data.DistributedSampler(
            self.train_set, num_replicas=self.info.world_size, rank=self.info.rank, shuffle=True,
            seed=cfg["seed"], drop_last=False,
        )
        self.train_loader = make_dataloader(self.train_set, tr["batch_size"], sampler=self.sampler,
                                            num_workers=tr["num_workers"])
        if self.splits.has_stress is not None:
            self.has_stress = self.splits.has_stress
        else:
            self.has_stress = any("stress" in self.train_set[k] for k in range(len(self.train_set)))
        self.loss_fn = WeightedLoss(tr["loss"], tr["energy_weight"], tr["forces_weight"], tr["stress_weight"],
                                    tr["huber_delta"], hessian_weight=tr["hessian_weight"])
        if tr["hessian_weight"] and getattr(self.model, "hessian_head", None) is None:
            raise ConfigError("training.hessian_weight > 0 needs a model with a Hessian head (model.hessian_head: true)")
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if tr["optimizer"] == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=tr["lr"], amsgrad=tr["amsgrad"], weight_decay=tr["weight_decay"])
        sp = dict(tr["scheduler_params"])
        if tr["scheduler"] == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=sp.get("factor", 0.8), patience=sp.get("patience", 50),
                threshold=sp.get("threshold", 1e-4), min_lr=sp.get("min_lr", 0.0),
            )
        elif tr["scheduler"] == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=sp.get("t_max", tr["epochs"]), eta_min=sp.get("eta_min", 0.0)
            )
        else:
            self.scheduler = None
        self.ema = ExponentialMovingAverage(self.model, tr["ema_decay"]) if tr["ema"] else None
        st = tr["stage_two"]
        if st is None:
            self.stage_two_start = None
        elif isinstance(st["start"], float):
            self.stage_two_start = int(st["start"] * tr["epochs"]) + 1
        else:
            self.stage_two_start = int(st["start"])
        # time budget: fractional schedules follow the epochs the budget holds (mlpot.train.budget)
        from mlpot.train.budget import TimeBudget

        self.budget = TimeBudget(tr["time_limit"], tr["epochs"]) if tr["time_limit"] is not None else None
        self.stage_two_info: dict | None = None

        # state
        self.epoch = 0
        self.stage = 1
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_state = None
        self.bad_epochs = 0
        self.history: list[dict] = []
        self.force_stage_two = False

    def eval_loader(self, dataset, batch_size=None):
        from mlpot.data import make_dataloader

        bs = batch_size or self.tr["valid_batch_size"] or 2 * self.tr["batch_size"]
        sampler = _StridedSampler(len(dataset), self.info.rank, self.info.world_size)
        return make_dataloader(dataset, bs, sampler=sampler, num_workers=self.tr["num_workers"])

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "format": "mlpot-checkpoint",
            "epoch": self.epoch,
            "stage": self.stage,
            "force_stage_two": self.force_stage_two,
            "stage_two_info": self.stage_two_info,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "loss_weights": [self.loss_fn.energy_weight, self.loss_fn.forces_weight, self.loss_fn.stress_weight],
            "best": {"loss": self.best_loss, "epoch": self.best_epoch, "state": self.best_state},
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
        }
        if self.replay is not None:
            state["replay"] = self.replay.state_dict()
        return state

    def save_checkpoint(self) -> None:
        if self.info.is_main:
            atomic_torch_save(self.state_dict(), self.out / CHECKPOINT)

    def load_checkpoint(self, path: Path) -> None:
        state = load_checkpoint_file(path)
        if not isinstance(state, dict) or state.get("format") != "mlpot-checkpoint":
            raise ConfigError(f"{path}: not an mlpot training checkpoint")
        if state["model_name"] != self.model_name:
            raise ConfigError(f"{path}: checkpoint is of model {state['model_name']}, config says {self.model_name}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ConfigError(f"{path}: checkpoint does not match the configured model: {exc}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch = int(state["epoch"])
        self.stage = int(state["stage"])
        self.force_stage_two = bool(state.get("force_stage_two", False))
        self.stage_two_info = state.get("stage_two_info")
        ew, fw, sw = state["loss_weights"]
        self.loss_fn.energy_weight, self.loss_fn.forces_weight, self.loss_fn.stress_weight = ew, fw, sw
        self.best_loss = float(state["best"]["loss"])
        self.best_epoch = int(state["best"]["epoch"])
        self.best_state = state["best"]["state"]
        self.bad_epochs = int(state["bad_epochs"])
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"])
        self.history = list(state["history"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ---- one epoch --------------------------------------------------------------------------
    def _time_up(self) -> bool:
        limit = self.tr["time_limit"]
        if limit is None:
            return False
        return ddp.broadcast_flag(time.monotonic() - self.t_start > 60.0 * limit, self.info)

    def train_epoch(self, epoch: int) -> tuple[dict, bool]:
        from mlpot.train.metrics import _to_device

        self.model.train()
        self.sampler.set_epoch(epoch)
        tr = self.tr
        show = tr["progress"] if tr["progress"] is not None else sys.stderr.isatty()
        loader = self.train_loader
        bar = None
        if show and self.info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        sums = {"loss": 0.0, "energy": 0.0, "forces": 0.0, "stress": 0.0}
        n_batches = 0
        stopped = False
        params = [p for p in self.model.parameters() if p.requires_grad]
        order = list(iter(self.sampler))  # this rank's frames, in the loader's order
        for b, graph in enumerate(loader):
            if self._time_up():
                stopped = True
                break
            if self.budget is not None and self.stage == 1 and self.stage_two_start is not None:
                self._stage_two_within_epoch(epoch, b, len(loader))
            graph = _to_device(graph, self.device)
            self.optimizer.zero_grad(set_to_none=True)
            out = self.model(graph, compute_force=True, compute_stress=self.has_stress, create_graph=True)
            loss, parts = self.loss_fn(out, graph, world_size=self.info.world_size)
            if self.replay is not None:  # the pretrained head on a replay batch (mlpot.train.finetune)
                loss = loss + self.replay.loss(self.model, self.loss_fn, self.device, self.info.world_size)
            loss_value = float(loss.detach())
            loss.backward()
            ddp.allreduce_gradients(params, self.info)
            grads = [p.grad for p in params if p.grad is not None]
            if tr["clip_grad"] is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=tr["clip_grad"])
            else:
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            bad = not (math.isfinite(loss_value) and math.isfinite(float(grad_norm)))
            if ddp.any_flag(bad, self.info):
                bs = tr["batch_size"]
                frames = [self.train_set.atoms(k) for k in order[b * bs:(b + 1) * bs]]
                what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {float(grad_norm)}"
                self._stop_non_finite(epoch, f"batch {b}: non-finite {what}; frames: " + ", ".join(_sources(frames)))
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            sums["loss"] += loss_value
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v  # "hessian" only with a Hessian loss
            n_batches += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / n_batches * self.info.world_size:.4g}")
        if bar is not None:
            bar.close()
        if self.info.enabled:
            import torch.distributed as dist

            t = torch.tensor([sums[k] for k in ("loss", "energy", "forces", "stress")], dtype=torch.float64,
                             device=self.device)
            dist.all_reduce(t)
            sums = dict(zip(("loss", "energy", "forces", "stress"), t.cpu().tolist()))
        n = max(n_batches, 1)
        return {k: v / n for k, v in sums.items()}, stopped

    def _stop_non_finite(self, epoch: int, detail: str):
        """Keep the last finite best model as ``model.pt``, write the log, and fail."""
        kept = "no model.pt written (no finite model yet)"
        if self.info.is_main:
            self._write_log()
            if self.best_state is not None:
                from mlpot.models.io import save_model

                self.model.load_state_dict(self.best_state)
                save_model(self.model, self.out / "model.pt", metadata={
                    "trained_with": "mlpot train", "epochs": epoch - 1, "best_epoch": self.best_epoch,
                    "stop_reason": "non_finite", "statistics": self.statistics})
                kept = f"model.pt holds the best model (epoch {self.best_epoch})"
        raise NonFiniteError(f"training stopped at epoch {epoch}, {detail}; {kept}")

    def validate(self) -> dict:
        ctx = self.ema.average_parameters(self.model) if self.ema is not None else _nullcontext(self.model)
        with ctx:
            if self.valid_set is None:
                return {}
            metrics = evaluate_loader(self.model, self.eval_loader(self.valid_set), self.device, self.loss_fn,
                                      self.info)
            return metrics

    def _current_weights(self) -> dict:
        ctx = self.ema.average_parameters(self.model) if self.ema is not None else _nullcontext(self.model)
        with ctx:
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _stage_two_reason(self, epoch: int) -> str | None:
        """Why stage two starts at ``epoch`` (None: stay in stage one); rank 0 decides."""
        if self.stage != 1 or self.stage_two_start is None:
            return None
        reason = None
        if self.force_stage_two:
            reason = "early stopping in stage one (no validation improvement)"
        elif epoch >= self.stage_two_start:
            reason = f"stage_two.start {self.tr['stage_two']['start']!r} is epoch {self.stage_two_start}"
        elif self.budget is not None:
            reason = self.budget.stage_two_reason(self.tr["stage_two"]["start"], epoch,
                                                  time.monotonic() - self.t_start)
        if not ddp.broadcast_flag(reason is not None, self.info):
            return None
        return reason or "rank 0's time budget"

    def _stage_two_within_epoch(self, epoch: int, batch: int, n_batches: int) -> None:
        """Start stage two between two batches when the time budget says so (rank 0 decides)."""
        progress = (epoch - 1 - self.budget.done_before) + batch / max(n_batches, 1)
        reason = self.budget.stage_two_due(self.tr["stage_two"]["start"], time.monotonic() - self.t_start,
                                           progress)
        if ddp.broadcast_flag(reason is not None, self.info):
            self._enter_stage_two(epoch, (reason or "rank 0's time budget") + f" (before batch {batch + 1})")

    def _budget_schedules(self, epoch: int) -> None:
        """Cosine annealing without an explicit ``t_max`` anneals over the epochs the time
        budget holds (:func:`mlpot.train.budget.cosine_lr`), once that is fewer than ``epochs``."""
        if self.budget is None or not isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            return
        if "t_max" in self.tr["scheduler_params"]:
            return
        from mlpot.train.budget import cosine_lr

        planned = self.budget.planned_epochs(time.monotonic() - self.t_start)
        planned = ddp.gather_objects(planned, self.info)[0]
        if planned is None or planned >= self.tr["epochs"]:
            return
        # within one invocation t_max only shrinks: a later, faster epoch must not raise the LR
        # again (cos(pi e / T) is monotone in e / T: e up and T down keep the LR falling); a resumed
        # run with a new budget plans afresh
        previous = getattr(self, "_budget_t_max", None)
        self._budget_t_max = max(planned if previous is None else min(planned, previous), 1)
        self.scheduler.T_max = self._budget_t_max
        lrs = [cosine_lr(lr0, self.scheduler.eta_min, self.scheduler.last_epoch, self.scheduler.T_max)
               for lr0 in self.scheduler.base_lrs]
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self.scheduler._last_lr = lrs

    def _patience(self) -> int:
        p = self.tr["patience"]
        if self.budget is None:
            return p
        p = self.budget.patience(p, time.monotonic() - self.t_start, self.tr["eval_every"])
        return ddp.gather_objects(p, self.info)[0]

    def _enter_stage_two(self, epoch: int, reason: str = "") -> None:
        st = self.tr["stage_two"]
        self.stage = 2
        self.stage_two_info = {"epoch": epoch, "reason": reason}
        self.loss_fn.energy_weight = float(st["energy_weight"])
        self.loss_fn.forces_weight = float(st["forces_weight"])
        if st["stress_weight"] is not None:
            self.loss_fn.stress_weight = float(st["stress_weight"])
        for g in self.optimizer.param_groups:
            g["lr"] = float(st["lr"])
        self.best_loss, self.best_state, self.best_epoch, self.bad_epochs = math.inf, None, 0, 0
        self.log(f"epoch {epoch}: stage two (energy_weight {st['energy_weight']}, "
                 f"forces_weight {st['forces_weight']}, lr {st['lr']})" + (f"; why: {reason}" if reason else ""))

    # ---- main loop --------------------------------------------------------------------------
    def fit(self) -> dict:
        tr = self.tr
        self.setup()
        ckpt = self.out / CHECKPOINT
        if self.resume:
            if ckpt.exists():
                self.load_checkpoint(ckpt)
                self.log(f"resumed from {ckpt} at epoch {self.epoch} (stage {self.stage})")
            else:
                self.log(f"--resume: no checkpoint in {self.out}, starting a new run")
        elif ckpt.exists():
            self.log(f"note: {ckpt} exists; starting a new run over it (use --resume to continue)")
        self.t_start = time.monotonic()
        if self.budget is not None:
            self.budget.done_before = self.epoch
            self.log(f"time budget {tr['time_limit']:g} min: stage two, cosine t_max and patience are placed "
                     "within it from the measured epoch time when the configured epochs do not fit")
        writer = self._tensorboard()
        self._wandb = None
        if self.tr["wandb"] and self.info.is_main:  # mlpot.train.wandb_log
            from mlpot.train.wandb_log import WandbLogger

            self._wandb = WandbLogger(self.tr["wandb"], self.out, self.cfg)
        stop_reason = "epochs"
        epoch = self.epoch
        while epoch < tr["epochs"]:
            if self._time_up():
                stop_reason = "time_limit"
                self.log(f"time limit of {tr['time_limit']} min reached; stopping")
                break
            epoch += 1
            t_epoch = time.monotonic()
            reason = self._stage_two_reason(epoch)
            if reason is not None:
                self._enter_stage_two(epoch, reason)
            t0 = time.perf_counter()
            train_stats, stopped = self.train_epoch(epoch)
            last = epoch == tr["epochs"] or stopped
            row = {"epoch": epoch, "stage": self.stage, "lr": self.optimizer.param_groups[0]["lr"],
                   "train_loss": train_stats["loss"], "train_e": train_stats["energy"],
                   "train_f": train_stats["forces"], "train_s": train_stats["stress"]}
            valid = {}
            if epoch % tr["eval_every"] == 0 or last:
                valid = self.validate()
                score = valid.get("loss", train_stats["loss"])
                if not math.isfinite(score):
                    self._stop_non_finite(epoch, f"non-finite validation loss {score}")
                if self.scheduler is not None and self.stage == 1:
                    if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        self.scheduler.step(score)
                if score < self.best_loss:
                    self.best_loss, self.best_epoch, self.bad_epochs = score, epoch, 0
                    self.best_state = self._current_weights()
                else:
                    self.bad_epochs += tr["eval_every"]
                row.update({"valid_loss": valid.get("loss"), "valid_e_mae": valid.get("e_mae"),
                            "valid_f_mae": valid.get("f_mae"), "valid_s_mae": valid.get("s_mae")})
                if "h_mae" in valid:  # a Hessian head on Hessian data (eV/Å²)
                    row["valid_h_mae"] = valid["h_mae"]
            if isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and self.stage == 1:
                self.scheduler.step()
                self._budget_schedules(epoch)
            row["time"] = time.perf_counter() - t0
            if stopped:
                row["partial"] = True
            self.history.append(row)
            self.epoch = epoch
            self._report(row, writer)
            if stopped:
                stop_reason = "time_limit"
                self.log(f"time limit of {tr['time_limit']} min reached during epoch {epoch}; stopping")
                break
            self._write_log()
            if epoch % tr["checkpoint_every"] == 0 or epoch == tr["epochs"]:
                self.save_checkpoint()
            if self.budget is not None:
                self.budget.record_epoch(time.monotonic() - t_epoch)
            if tr["patience"] is not None and self.valid_set is not None and self.bad_epochs >= self._patience():
                if self.stage == 1 and self.stage_two_start is not None and epoch < tr["epochs"]:
                    self.force_stage_two = True
                    self.log(f"no validation improvement for {self.bad_epochs} epochs: moving to stage two")
                else:
                    stop_reason = "early_stopping"
                    self.log(f"early stopping at epoch {epoch} (best epoch {self.best_epoch})")
                    break
        self._write_log()
        if writer is not None:
            writer.close()
        if self._wandb is not None:
            self._wandb.close()
        return self.finish(stop_reason)

    def _report(self, row: dict, writer) -> None:
        msg = f"epoch {row['epoch']:4d}  loss {row['train_loss']:.4g}"
        if row.get("valid_loss") is not None:
            msg += f"  valid loss {row['valid_loss']:.4g}"
        if row.get("valid_e_mae") is not None:
            msg += f"  E {row['valid_e_mae']:.2f} meV/atom"
        if row.get("valid_f_mae") is not None:
            msg += f"  F {row['valid_f_mae']:.1f} meV/Å"
        if row.get("valid_s_mae") is not None:
            msg += f"  S {row['valid_s_mae']:.3f} meV/Å^3"
        msg += f"  lr {row['lr']:.2e}  {row['time']:.1f} s"
        self.log(msg)
        if getattr(self, "_wandb", None) is not None:
            self._wandb.log(row)
        if writer is not None and self.info.is_main:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch" and v is not None:
                    writer.add_scalar(k, v, row["epoch"])

    def _tensorboard(self):
        if not self.tr["tensorboard"] or not self.info.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - optional dependency
            self.log("tensorboard requested but not installed; skipping")
            return None
        return SummaryWriter(log_dir=str(self.out / "tensorboard"))

    def _write_log(self) -> None:
        if not self.info.is_main:
            return
        cols = ["epoch", "stage", "lr", "train_loss", "train_e", "train_f", "train_s", "valid_loss",
                "valid_e_mae", "valid_f_mae", "valid_s_mae", "time"]
        if any("valid_h_mae" in row for row in self.history):
            cols.insert(-1, "valid_h_mae")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in self.history:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
        atomic_write_text(self.out / "log.csv", buf.getvalue())

    def finish(self, stop_reason: str) -> dict:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        elif self.ema is not None:
            self.ema.copy_to(self.model)
        self.model.eval()
        metadata = {
            "trained_with": "mlpot train",
            "epochs": self.epoch,
            "best_epoch": self.best_epoch,
            "stop_reason": stop_reason,
            "statistics": self.statistics,
        }
        if self.stage_two_info is not None:
            metadata["stage_two"] = self.stage_two_info
        if self.info.is_main:
            from mlpot.models.io import save_model

            save_model(self.model, self.out / "model.pt", metadata=metadata)
        results = {}
        sets = {"train": self.train_set, "valid": self.valid_set}
        from mlpot.data import AtomicDataset

        for name, atoms in self.splits.tests.items():
            sets[name] = AtomicDataset(atoms, self.model.r_max, self.dtype, precompute=False)
        for name, ds in sets.items():
            if ds is None or len(ds) == 0:
                continue
            results[name] = evaluate_loader(self.model, self.eval_loader(ds), self.device, None, self.info)
        if self.replay is not None:  # the pretrained head on the replay set
            trained = self.model.active_head
            self.model.select_head(self.replay.head)
            try:
                results[f"replay ({self.replay.head})"] = evaluate_loader(
                    self.model, self.eval_loader(self.replay.dataset), self.device, None, self.info)
            finally:
                self.model.select_head(trained)
        if self.info.is_main:
            atomic_write_text(self.out / "metrics.json", json.dumps(results, indent=2) + "\n")
            self.log("\n" + format_table(results))
            self.log(f"best epoch {self.best_epoch}; stopped by {stop_reason}; model: {self.out / 'model.pt'}")
            try:
                from mlpot.train.plot import plot_learning_curve

                plot_learning_curve(self.history, self.out / "learning_curve.png")
            except Exception as exc:  # noqa: BLE001 - a plot must never fail a run
                self.log(f"could not draw the learning curve: {exc}")
        self._barrier()
        ddp.teardown(self.info)
        return results


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def train(cfg: dict, resume: bool = False, log=None) -> dict:
    """Train from a validated config (see :func:`mlpot.train.config.load_config`); returns metrics.

    The output folder is locked for the whole run (by the main process)."""
    trainer = Trainer(cfg, resume=resume, log=log)
    if not trainer.info.is_main:
        return trainer.fit()
    from mlpot.train.runlock import RunLock

    with RunLock(trainer.out):
        return trainer.fit()
