"""`mlpot train CONFIG.yaml [--set key.sub=value ...] [--resume]`.

The YAML file is the whole run; ``--set`` overrides any key (values parsed as YAML). One
``--set`` takes several pairs, and it may be repeated; pairs apply left to right, so a later
pair wins::

    mlpot train C.yaml --set output=runs/x training.epochs=5 --set data.test=[a.xyz,b.xyz]

Every pair goes through the same validation as the YAML file (unknown keys get a "did you
mean" hint). Under ``torchrun`` every rank runs this same command (see
:mod:`mlpot.train.distributed`).
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    # optional for argparse, so that `--set a=1 C.yaml` (the file swallowed by --set) gets a clear hint
    parser.add_argument("config", nargs="?", help="YAML training config (see configs/ and README 'Training')")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set training.epochs=10 output=runs/x "
                             "(several pairs per --set; repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <output>/checkpoint.pt (starts fresh when there is none)")
    parser.add_argument("--check", action="store_true", help="validate the config, print it and exit")


def flatten_overrides(groups) -> list[str]:
    """``[[a=1, b=2], [c=3]]`` (argparse's append of ``nargs='+'``) -> ``[a=1, b=2, c=3]``.
    A bare word without ``=`` (e.g. a config file placed after ``--set``) is a ConfigError."""
    from mlpot.errors import ConfigError

    out = []
    for group in groups:
        for item in [group] if isinstance(group, str) else group:
            if "=" not in item:
                hint = ("; put the config file before --set" if item.lower().endswith((".yaml", ".yml"))
                        else "")
                raise ConfigError(f"--set {item!r}: expected key.sub=value{hint}")
            out.append(item)
    return out


def run(args) -> int:
    from mlpot.errors import ConfigError
    from mlpot.train.config import load_config

    overrides = flatten_overrides(args.overrides)
    if args.config is None:
        raise ConfigError("no config file given: mlpot train CONFIG.yaml [--set key=value ...]")
    cfg = load_config(args.config, overrides)
    if args.check:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    from mlpot.train.trainer import train

    train(cfg, resume=args.resume)
    return 0
