"""Autoencoder families (KL, tiny and the Wan video VAEs), presets, and loading from the checkpoints users have."""

from .autoencoder import Autoencoder
from .config import PRESETS, KLConfig, TinyConfig, WanConfig, preset
from .loading import DEFAULT_MODEL, build, config_to_json, load_model, save_model
from .video_autoencoder import VideoAutoencoder

__all__ = ["Autoencoder", "PRESETS", "KLConfig", "TinyConfig", "preset", "build", "load_model",
           "config_to_json", "DEFAULT_MODEL", "save_model", "WanConfig", "VideoAutoencoder"]
