"""hf-flower: federated fine-tuning of Hugging Face models with Flower and `transformers.Trainer`."""

from .constants import VERSION as __version__

__all__ = ["__version__"]
