"""Weakly-supervised object localisation (docs/wsol.md), trained by `python -m train.wsol`.

- `config`: `WsolConfig`, the options that define a run and its `config.json`.
- `data`: the class-folder or synthetic dataset, its split, training batches and validation
  share.
- `steps`: `Wsol` (init, train and eval steps, CAMs), `build_wsol`, the warm start, validation.
- `inference`: the `localize` command's work.
- `figures`: CAM overlays with predicted and true boxes.
"""
