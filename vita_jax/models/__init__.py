"""Flax modules, one file per part of the paper, each with its PyTorch key table."""
