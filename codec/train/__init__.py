"""Training: a tiny autoencoder from scratch, or a decoder fine-tuned behind a frozen encoder.

``python -m codec.train --help`` (or ``codec train``) for the command; ``Trainer``/``TrainConfig``
for code.
"""

from .trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
