"""codec: move video in and out of the latent space of diffusion models, fast."""

__version__ = "0.1.0"

from .models import Autoencoder, build, load_model  # noqa: E402

__all__ = ["__version__", "Autoencoder", "build", "load_model"]
