"""`mlpot train CONFIG.yaml [--set key.sub=value ...] [--resume]`.

The YAML file is the whole run; ``--set`` overrides any key (values parsed as YAML, e.g.
``--set training.epochs=5 --set data.test=[a.xyz,b.xyz]``). Under ``torchrun`` every rank
runs this same command (see :mod:`mlpot.train.distributed`).
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML training config (see configs/ and README 'Training')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.epochs=10 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <output>/checkpoint.pt (starts fresh when there is none)")
    parser.add_argument("--check", action="store_true", help="validate the config, print it and exit")


def run(args) -> int:
    from mlpot.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.check:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    from mlpot.train.trainer import train

    train(cfg, resume=args.resume)
    return 0
