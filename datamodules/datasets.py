"""Dataset classes behind ImageDataModule: in-memory tensors (batched transforms, optionally on the
accelerator) and image files decoded with PIL."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset


class TensorImageDataset(Dataset):
    """Integer images held in memory; scaling, resizing and flipping run on whole batches.

    The DataLoader calls ``__getitems__`` with a batch of indices, so a batch costs a few tensor ops and no
    per-image Python; build loaders with ``collate_fn=collate_batch`` (as the DataModule does).
    """

    def __init__(self, images: Tensor, labels: Tensor, max_value: float, image_size: int,
                 hflip: bool) -> None:
        self.images, self.labels = images, labels
        self.max_value, self.image_size, self.hflip = float(max_value), image_size, hflip

    def __len__(self) -> int:
        return len(self.labels)

    def transform(self, x: Tensor) -> Tensor:
        """uint8 (B, C, h, w) -> float32 (B, C, S, S) in [-1, 1], randomly mirrored if ``hflip``."""
        x = x.float() * (2.0 / self.max_value) - 1.0
        s = self.image_size
        if x.shape[-2:] != (s, s):
            # Antialias only matters when shrinking. Bilinear weights are non-negative, so the clamp only
            # removes float rounding, keeping the documented [-1, 1] range exact.
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                              antialias=s < x.shape[-1]).clamp_(-1.0, 1.0)
        if self.hflip:
            flip = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.contiguous()

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.transform(self.images[idx]), self.labels[idx]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]


class DeviceBatches(IterableDataset):
    """Shuffled training batches gathered where the images live (the accelerator, with ``on_device``).

    The permutation is drawn on that device from (seed, epoch), identical on every rank, and rank r
    takes every world-th index, so no index tensor crosses from the host and the loop never waits on
    the device. Iterate with ``DataLoader(batch_size=None, num_workers=0)``.
    """

    def __init__(self, dataset: TensorImageDataset, batch_size: int, drop_last: bool, seed: int,
                 epoch: Callable[[], int], rank: int = 0, world: int = 1) -> None:
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world

    def __len__(self) -> int:
        per_rank = len(self.dataset) // self.world  # equal counts on every rank keep DDP in step
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self):
        images, labels = self.dataset.images, self.dataset.labels
        gen = torch.Generator(device=images.device).manual_seed(self.seed + 1000003 * self.epoch())
        perm = torch.randperm(len(labels), generator=gen, device=images.device)
        mine = perm[self.rank::self.world][: len(labels) // self.world]
        for i in range(len(self)):
            idx = mine[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.dataset.transform(images[idx]), labels[idx]


def collate_batch(batch: tuple[Tensor, Tensor] | list) -> tuple[Tensor, Tensor]:
    """Pass batches from ``TensorImageDataset.__getitems__`` through; collate per-sample lists as usual."""
    if isinstance(batch, tuple):
        return batch
    return torch.utils.data.default_collate(batch)


class ImageFileDataset(Dataset):
    """(path, label) pairs decoded with PIL, always converted to RGB."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label
