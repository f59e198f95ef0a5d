"""codec: move video in and out of the latent space of diffusion models, fast.

Public names: ``load_model``/``build`` (models), ``encode_video``/``decode_video``/
``roundtrip_video`` (streaming files), ``FrameEncoder``/``FrameDecoder``/``CoderOptions``
(frames <-> latents in memory, tiled and cached).
"""

__version__ = "0.1.0"

from .coder import CoderOptions, FrameDecoder, FrameEncoder  # noqa: E402
from .models import Autoencoder, build, load_model  # noqa: E402
from .pipeline import decode_video, encode_video, roundtrip_video  # noqa: E402

__all__ = ["__version__", "Autoencoder", "build", "load_model", "CoderOptions", "FrameEncoder", "FrameDecoder",
           "encode_video", "decode_video", "roundtrip_video"]
