"""Networks fguide implements itself, loadable from the public weight files.

- ADM's UNet and noise-aware EncoderUNet classifier (:mod:`fguide.models.adm`), built from the
  reference's flags and official presets (:mod:`fguide.models.presets`), loaded safely
  (:mod:`fguide.models.loading`).
- torchvision-compatible ResNet-18…152 with optional Softplus (:mod:`fguide.models.resnet`).
- The TF-compatible FID Inception-v3 (:mod:`fguide.models.inception`).
- EDM's ``DhariwalUNet``/``EDMPrecond`` (:mod:`fguide.models.edm`), read from NVlabs network
  pickles without running their embedded code (:mod:`fguide.models.nvlabs`).
"""

from fguide.models.adm import EncoderUNetModel, UNetModel
from fguide.models.edm import DhariwalUNet, EDMDenoiser, EDMPrecond
from fguide.models.inception import FIDInception, InceptionOutputs, load_fid_inception
from fguide.models.loading import UnsafeCheckpointError, load_model, load_state_dict_file
from fguide.models.nvlabs import load_edm_denoiser, load_network_pickle
from fguide.models.presets import PRESETS, build_preset, create_classifier, create_model
from fguide.models.resnet import ImageClassifier, ResNet, load_resnet, resnet

__all__ = [
    "PRESETS",
    "DhariwalUNet",
    "EDMDenoiser",
    "EDMPrecond",
    "EncoderUNetModel",
    "FIDInception",
    "ImageClassifier",
    "InceptionOutputs",
    "ResNet",
    "UNetModel",
    "UnsafeCheckpointError",
    "build_preset",
    "create_classifier",
    "create_model",
    "load_edm_denoiser",
    "load_fid_inception",
    "load_model",
    "load_network_pickle",
    "load_resnet",
    "load_state_dict_file",
    "resnet",
]
