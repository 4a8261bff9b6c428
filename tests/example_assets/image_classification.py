"""Tiny assets for `examples/image_classification.py`: a randomly initialised ViT (~75k parameters)
for 16x16 images with its image processor, and the real scikit-learn digits (bundled, offline)."""

import pathlib


def build(folder: pathlib.Path) -> dict:
    """Save the tiny ViT and its processor to `folder`; return the example's config for a few hundred digits."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    model_dir = folder / "tiny-vit"
    # Four 8x8 patches of a 16x16 image: with fewer, wider tokens it learns the digits within a few steps.
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(model_dir)
    # The PIL backend of ViTImageProcessor: the default one needs torchvision.
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(model_dir)
    return {
        "model_name_or_path": str(model_dir),
        "dataset": "sklearn-digits",
        "max_train_samples": 128,  # 64 per client of two: 57 to train on (8 steps a round), 7 held out
        "max_eval_samples": 32,
        "learning_rate": 1e-3,
        "num_train_epochs": 2,
        "per_device_train_batch_size": 8,
        "output_dir": str(folder / "outputs"),
    }
