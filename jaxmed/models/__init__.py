"""The networks of jaxmed's systems, assembled from `jaxmed.layers`.

- `jaxmed.models.resnet`: `ResNet` and its variants `ResNet18` … `ResNet152` (2-D and 3-D,
  dilated stages, injected `conv` and `norm` layers, optional classifier), built from the
  blocks `BasicBlock`, `Bottleneck` and `ResNetLayer` that other networks reuse.
- `jaxmed.models.mapping_gan`: the mapping generator (`UNet`, key feature map M(x)) and the
  tensor-train Wasserstein critic (`Critic`) of the mapping GAN (`docs/mapping_gan.md`).
- `jaxmed.models.vgg_cam`: `VGGCAM`, the VGG16 CAM classifier with threshold-suppression
  modules after named conv layers (`docs/wsol.md`).
- `jaxmed.models.segmentation`: `SegmentationNet`, stem → CBAM → dilated ResNet (18–152, the
  layers of `jaxmed.models.resnet`) → CBAM → pyramid pooling → head, with an optional
  auxiliary head (`docs/segmentation.md`).
- `jaxmed.models.attention_resnet`: `AttentionResNet18`, ResNet-18 with spatial attention after
  the stem and after the last layer, returning a feature, an attention score and (for
  pre-training) class logits per image: the whole-slide system's networks
  (`docs/pathology.md`).
- `jaxmed.models.feature_classifier`: `FeatureClassifier`, conv blocks → flatten → FC 16 → FC
  classes, with a swappable activation: the classifier whose feature nodes the atlas explains
  (`docs/atlas.md`).

Each submodule is imported on its own (`from jaxmed.models.resnet import ResNet50`), so using
one system's networks does not build the others.
"""
