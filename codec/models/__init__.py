"""Autoencoder families (KL, tiny and the Wan video VAEs), presets, and loading from the checkpoints users have."""

from .autoencoder import Autoencoder
from .config import PRESETS, KLConfig, TinyConfig, WanConfig, config_from_dict, preset
from .identity import weights_digest
from .loading import DEFAULT_MODEL, build, config_to_json, load_model, save_model
from .video_autoencoder import VideoAutoencoder

__all__ = ["Autoencoder", "PRESETS", "KLConfig", "TinyConfig", "preset", "build", "load_model",
           "config_to_json", "config_from_dict", "DEFAULT_MODEL", "save_model", "weights_digest",
           "WanConfig", "VideoAutoencoder"]
