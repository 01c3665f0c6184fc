"""The networks of jaxmed's systems, assembled from `jaxmed.layers`.

- `jaxmed.models.mapping_gan`: the mapping generator (`UNet`, key feature map M(x)) and the
  tensor-train Wasserstein critic (`Critic`) of the mapping GAN (SPEC S0).

Each submodule is imported on its own (`from jaxmed.models.mapping_gan import UNet`), so using
one system's networks does not build the others.
"""
