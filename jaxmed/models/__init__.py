"""The networks of jaxmed's systems, assembled from `jaxmed.layers`.

- `jaxmed.models.mapping_gan`: the mapping generator (`UNet`, key feature map M(x)) and the
  tensor-train Wasserstein critic (`Critic`) of the mapping GAN (SPEC S0).
- `jaxmed.models.vgg_cam`: `VGGCAM`, the VGG16 CAM classifier with threshold-suppression
  modules after named conv layers (SPEC S1).
- `jaxmed.models.segmentation`: `SegmentationNet`, stem → CBAM → dilated ResNet (18–152) →
  CBAM → pyramid pooling → head, with an optional auxiliary head (SPEC S4).

Each submodule is imported on its own (`from jaxmed.models.mapping_gan import UNet`), so using
one system's networks does not build the others.
"""
