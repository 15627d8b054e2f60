"""Simulation drivers: relaxation (ASE optimizers and batched FIRE in torch), molecular dynamics."""
