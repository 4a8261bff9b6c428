"""hf-flower: federated fine-tuning of Hugging Face models with Flower and `transformers.Trainer`."""

__version__ = "0.1.0"
