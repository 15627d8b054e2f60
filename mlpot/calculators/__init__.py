"""mlpot.calculators: the ASE calculator for mlpot models."""
from mlpot.calculators.mlpot_calculator import MLPotCalculator

__all__ = ["MLPotCalculator"]
