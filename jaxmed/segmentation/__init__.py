"""Segmentation (SPEC S4): training step, validation, figures, predict."""
