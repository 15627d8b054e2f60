"""Weights & Biases logging of a training run, beside ``log.csv`` and TensorBoard.

``training.wandb: true`` (or a mapping of ``project``, ``entity``, ``name``, ``mode``,
``tags``) starts one wandb run per training run (main process only), with the resolved config
as its config, and logs each epoch's row of ``log.csv`` (losses, validation MAEs, learning
rate, time) at ``step = epoch``. ``mode: offline`` writes the run under ``<output>/wandb``
without a network (``wandb sync`` uploads it later). Asking for wandb without the package
installed is a ConfigError (``pip install 'mlpot[wandb]'``), never a silent skip.
"""
from __future__ import annotations

from mlpot.errors import ConfigError

__all__ = ["WandbLogger", "WANDB_KEYS"]

WANDB_KEYS = ("project", "entity", "name", "mode", "tags")


def _settings(value) -> dict:
    if value is True:
        return {}
    from mlpot.train.config import _unknown

    for k in value:
        if k not in WANDB_KEYS:
            raise _unknown(f"training.wandb.{k}", WANDB_KEYS)
    mode = value.get("mode")
    if mode is not None and mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"config key `training.wandb.mode`: {mode!r} is not one of online, offline, disabled")
    return dict(value)


class WandbLogger:
    def __init__(self, setting, out_dir, config: dict):
        opts = _settings(setting)
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(f"config key `training.wandb`: wandb is not installed: pip install 'mlpot[wandb]' "
                              f"({exc})") from None
        self._wandb = wandb
        (out_dir / "wandb").parent.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=opts.get("project", "mlpot"), entity=opts.get("entity"),
                              name=opts.get("name", out_dir.name), mode=opts.get("mode"), tags=opts.get("tags"),
                              dir=str(out_dir), config=config, reinit="finish_previous")

    def log(self, row: dict) -> None:
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None and k != "epoch"}
        self.run.log(values, step=int(row["epoch"]))

    def close(self) -> None:
        self.run.finish()
