"""Command-line interface; see :mod:`mlpot.cli.main`."""
