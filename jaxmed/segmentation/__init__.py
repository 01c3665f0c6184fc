"""Segmentation: configuration (`config`), data sources (`data`), the system and its validation
(`steps`), `predict` (`inference`) and figures (`figures`). See docs/segmentation.md."""
