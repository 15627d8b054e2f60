"""mlpot.train."""
