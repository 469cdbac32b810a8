"""Data modules: one LightningDataModule shared by the diffusion model and the noisy classifier."""

from datamodules.image_datamodule import DATASETS, ImageDataModule

__all__ = ["DATASETS", "ImageDataModule"]
