"""Weakly-supervised object localisation (SPEC S1): training step, validation, figures, localize."""
