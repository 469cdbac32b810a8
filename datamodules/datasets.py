"""Dataset classes behind ImageDataModule: in-memory tensors (batched transforms, optionally on the
accelerator) and image files decoded with PIL, and the resumable training order (EpochSampler, DeviceBatches,
ResumableLoader): a pure function of (seed, epoch), checkpointed mid-epoch."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset


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


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> Tensor:
    """The training order of one epoch, drawn on `device`: a pure function of (seed, epoch), the same on every rank."""
    gen = torch.Generator(device=device).manual_seed(seed + 1000003 * epoch)
    return torch.randperm(n, generator=gen, device=device)


class EpochSampler(DistributedSampler):
    """This rank's training indices, in an order that is a pure function of (seed, epoch).

    Rank r of `world` takes every world-th index of `epoch_permutation`, cut to n // world so every rank
    runs the same number of steps (the DeviceBatches rule). Being a DistributedSampler, it tells Lightning
    the loader is sharded already: Lightning neither injects its own sampler nor rebuilds the loader, and
    still calls `set_epoch` at every epoch start. `start` skips the first indices of the next pass only
    (ResumableLoader sets it on a mid-epoch resume).
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, world: int = 1) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.num_samples = len(dataset) // world  # type: ignore[arg-type]
        self.total_size = self.num_samples * world
        self.start = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        start, self.start = self.start, 0
        perm = epoch_permutation(len(self.dataset), self.seed, self.epoch)  # type: ignore[arg-type]
        return iter(perm[self.rank::self.num_replicas][start:self.num_samples].tolist())


class DeviceBatches(IterableDataset):
    """Shuffled training batches gathered where the images live (the accelerator, with ``on_device``).

    The permutation is drawn on that device from (seed, epoch), identical on every rank, and rank r
    takes every world-th index, so no index tensor crosses from the host and the loop never waits on
    the device. Iterate with ``ResumableLoader(batch_size=None, num_workers=0)``; `start` skips the first
    batches of the next pass only (a mid-epoch resume).
    """

    def __init__(self, dataset: TensorImageDataset, batch_size: int, drop_last: bool, seed: int,
                 epoch: Callable[[], int], rank: int = 0, world: int = 1) -> None:
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.start = 0

    def __len__(self) -> int:
        per_rank = len(self.dataset) // self.world  # equal counts on every rank keep DDP in step
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self):
        start, self.start = self.start, 0
        images, labels = self.dataset.images, self.dataset.labels
        perm = epoch_permutation(len(labels), self.seed, self.epoch(), images.device)
        mine = perm[self.rank::self.world][: len(labels) // self.world]
        for i in range(start, len(self)):
            idx = mine[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.dataset.transform(images[idx]), labels[idx]


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch: Lightning saves its ``state_dict()`` (epoch, batches handed
    out) with the fit loop in every checkpoint and calls ``load_state_dict()`` on resume before iterating, so a
    resumed fit continues the interrupted epoch at its next unseen batch instead of replaying the epoch.

    Order comes from an EpochSampler (skips indices) or a DeviceBatches dataset (skips batches). The position
    counts batches handed to the consumer, not what workers prefetched. The loader draws its workers' base
    seed from its own generator, reseeded from (seed, epoch), never from the global torch RNG the training
    step draws from. Exact resume of flips holds with num_workers=0 (flips then draw from the checkpointed
    global RNG); worker processes restart their own RNGs.
    """

    def __init__(self, *args, **kwargs) -> None:  # DataLoader's own signature: Lightning may re-instantiate it
        super().__init__(*args, **kwargs)
        self._epoch, self._position = 0, 0
        self._resume_at: tuple[int, int] | None = None

    def _order(self) -> EpochSampler | DeviceBatches | None:
        if isinstance(self.dataset, DeviceBatches):
            return self.dataset
        return self.sampler if isinstance(self.sampler, EpochSampler) else None

    def _current_epoch(self) -> int:
        order = self._order()
        if isinstance(order, DeviceBatches):
            return int(order.epoch())
        return int(getattr(self.sampler, "epoch", 0))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def __iter__(self):
        # A generator: everything below runs at the first next(), after Lightning's set_epoch.
        epoch, skip = self._current_epoch(), 0
        if self._resume_at is not None:
            saved_epoch, saved = self._resume_at
            self._resume_at = None
            # A finished epoch (saved == len) or another epoch (Lightning moved on) resumes nothing.
            if saved_epoch == epoch and 0 < saved < len(self):
                skip = saved
        order = self._order()
        if self.generator is not None and order is not None:
            self.generator.manual_seed(order.seed * 1000003 + epoch + 1)
        if isinstance(order, DeviceBatches):
            order.start = skip
        elif isinstance(order, EpochSampler):
            order.start = skip * (self.batch_size or 1)
        self._epoch, self._position = epoch, skip
        iterator = super().__iter__()
        if order is None:  # a sampler Lightning swapped in (e.g. overfit_batches): skip by drawing
            for _ in range(skip):
                next(iterator, None)
        for batch in iterator:
            self._position += 1
            yield batch


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
