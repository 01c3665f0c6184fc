"""jaxmed: JAX/Flax layers and training programs for explainable medical-image deep learning."""

__version__ = "0.1.0"
