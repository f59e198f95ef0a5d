"""codec: move video in and out of the latent space of diffusion models, fast.

Public names: ``load_model``/``build`` (models), ``encode_video``/``decode_video``/
``roundtrip_video`` (streaming files), ``FrameEncoder``/``FrameDecoder``/``CoderOptions``
(frames <-> latents in memory, tiled and cached).
"""

__version__ = "0.1.0"

# Public names load on first use (PEP 562), so that the command starts without importing torch:
# its start-up is then inside its own error handling (a Ctrl-C there gives one line).
_PUBLIC = {"CoderOptions": "coder", "FrameDecoder": "coder", "FrameEncoder": "coder", "Autoencoder": "models",
           "build": "models", "load_model": "models", "decode_video": "pipeline", "encode_video": "pipeline",
           "roundtrip_video": "pipeline"}

__all__ = ["__version__", "Autoencoder", "build", "load_model", "CoderOptions", "FrameEncoder", "FrameDecoder",
           "encode_video", "decode_video", "roundtrip_video"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'codec' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
