"""Pretrained weights: torchvision state dicts in safetensors files, mapped onto our networks.

    python -m jaxmed.weights convert IN.pth OUT.safetensors    # once, where torch is installed

Reading needs only `safetensors` and NumPy; no pickle is ever loaded. The mapping (key names,
layouts) is described in `jaxmed.weights._torchvision` and docs/training.md.
"""

from jaxmed.weights._convert import convert as convert
from jaxmed.weights._torchvision import ARCHITECTURES as ARCHITECTURES
from jaxmed.weights._torchvision import Loaded as Loaded
from jaxmed.weights._torchvision import load_torchvision as load_torchvision
from jaxmed.weights._torchvision import pretrained_loader as pretrained_loader
from jaxmed.weights._torchvision import read_state_dict as read_state_dict
