"""One LightningDataModule for every dataset the framework trains on (diffusion model and noisy classifier).

Images come out as float32 (C, H, W) in [-1, 1], labels as int64. Nothing is downloaded unless
``download=True``; missing files raise one FileNotFoundError that names the files, the directory and the fix.
"""

from pathlib import Path
from typing import Literal

import lightning.pytorch as L
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.datasets import (
    DeviceBatches,
    EpochSampler,
    ImageFileDataset,
    ResumableLoader,
    TensorImageDataset,
    collate_batch,
)
from datamodules.sources import CIFAR as _CIFAR
from datamodules.sources import IMG_EXTENSIONS as _IMG_EXTENSIONS
from datamodules.sources import MNIST_FILES as _MNIST_FILES
from datamodules.sources import PICKLE_ALLOWED as _PICKLE_ALLOWED  # noqa: F401 (kept importable from here)
from datamodules.sources import CifarUnpickler as _CifarUnpickler  # noqa: F401 (kept importable from here)
from datamodules.sources import content_fingerprint, load_split, scan_images
from datamodules.sources import load_pickle as _load_pickle
from lightning_modules.diffusion.options import OptionError

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "folder")
# name -> (num_classes, native image size, channels): constants, so the CLI can link them before setup().
_SPECS = {
    "digits": (10, 8, 1),
    "mnist": (10, 28, 1),
    "fashion_mnist": (10, 28, 1),
    "cifar10": (10, 32, 3),
    "cifar100": (100, 32, 3),
}
# Mirror-imaging a digit or a garment label can change what it depicts ("2" vs "S"); natural images are safe.
_NO_FLIP = ("digits", "mnist", "fashion_mnist")
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_DATA_OPTION = "data.data_dir"  # the option named when the files themselves are unusable


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded per-class split: (train indices, val indices), both sorted; same seed, same split."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=gen)
    val = []
    for c in labels.unique():  # a loop over classes, not images
        members = perm[labels[perm] == c]
        val.append(members[: min(len(members), round(val_fraction * len(members)))])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[torch.cat(val)] = True
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)


class ImageDataModule(L.LightningDataModule):
    """Train/val images in [-1, 1] for digits, MNIST, Fashion-MNIST, CIFAR-10/100 or an image folder.

    ``num_classes``, ``image_size``, ``channels``, ``dataset_id`` and ``class_names`` are known right after
    construction (``dataset_id`` hashes the files on first use; a folder's images are then also checked).
    MNIST/Fashion-MNIST/CIFAR use the official test split as val (``val_fraction`` and ``seed`` do not apply);
    digits and a folder without ``train/``+``val/`` are split by ``seed`` and ``val_fraction``.
    Folder images are always decoded as RGB (channels = 3), resized on the short side and center-cropped;
    without ``image_size`` they keep the short side of the first image.

    Args:
        name: the data set: digits (embedded, offline), mnist, fashion_mnist, cifar10, cifar100, or folder
            (data_dir/<class>/*.png, or data_dir/train/<class>/ and data_dir/val/<class>/).
        data_dir: where the files are (or are downloaded to with download=true).
        image_size: resize to this side in pixels; null = the data set's own size.
        batch_size: training batch size per process.
        num_workers: DataLoader worker processes (0 = load in the main process).
        val_fraction: share held out for validation where the data set has no official split.
        seed: seed of that split and of the training order.
        download: fetch MNIST / Fashion-MNIST / CIFAR when missing (needs the network).
        hflip: random horizontal flips in training; null = on for CIFAR and folders, off for digits/MNIST.
        on_device: keep a small tensor data set on the accelerator and gather batches there (no workers).
    """

    def __init__(self, name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "folder"] = "digits",
                 data_dir: str = "data", image_size: int | None = None,
                 batch_size: int = 128, num_workers: int = 0, val_fraction: float = 0.15,
                 seed: int = 0, download: bool = False, hflip: bool | None = None, on_device: bool = False) -> None:
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")
        if name in _NO_FLIP and hflip:
            raise ValueError(f"hflip=True is not allowed for {name!r}: a mirrored digit or garment can "
                             "change class meaning.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        if on_device and (name == "folder" or num_workers > 0):
            raise ValueError("on_device=True keeps an in-memory dataset on the accelerator and gathers batches "
                             "in the main process: it needs a tensor dataset (not 'folder') and num_workers=0.")
        if name == "folder" and download:
            raise ValueError("download=True is not available for name='folder'; place images in data_dir.")
        # image_size is linked into the model as the *resolved* size; logging the raw None here too
        # makes Lightning refuse the differing values.
        self.save_hyperparameters(ignore=["image_size"])
        self.name, self.data_dir = name, Path(data_dir).expanduser()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.seed, self.download = val_fraction, seed, download
        self.hflip: bool = (name not in _NO_FLIP) if hflip is None else hflip
        self.on_device = on_device
        self._class_names: list[str] | None = None
        self._splits: dict[str, tuple] | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self._dataset_id: str | None = None  # the content fingerprint is computed once, on first use
        self._folder: tuple[list, list | None, str] | None = None  # (train, val, fingerprint) once scanned

        if name == "folder":
            self._train_root, self._val_root = self._folder_roots()
            self._class_names = self._scan_classes(self._train_root)
            if len(self._class_names) < 2:
                self._too_few_classes(self._class_names)
            self.num_classes, self.channels = len(self._class_names), 3
            self.image_size = image_size or self._first_image_size(self._train_root)
            split = "trainval" if self._val_root else f"seed{seed}-val{val_fraction:g}"
            self._id_prefix = f"folder-{self.data_dir.resolve().name}-{{tag}}-{self.image_size}px-c3-{split}"
        else:
            self.num_classes, native, self.channels = _SPECS[name]
            self.image_size = image_size or native
            split = f"seed{seed}-val{val_fraction:g}" if name == "digits" else "official"
            self._id_prefix = f"{name}-{self.image_size}px-c{self.channels}-{split}"
            if name == "digits":  # digits ships inside scikit-learn: no files to fingerprint
                self._dataset_id = self._id_prefix
            else:  # the others are files in data_dir, any data_dir
                self._id_prefix += "-{tag}"
            if name in ("digits", "mnist"):
                self._class_names = [str(i) for i in range(10)]
            elif name == "fashion_mnist":
                self._class_names = list(_FASHION_CLASSES)
            if name != "digits" and not download:
                self._raise_if_missing()  # fail at construction, before any model is built

    # ------------------------------------------------------------------ files
    @property
    def dataset_id(self) -> str:
        """Names the data for the reference-feature and evaluator caches: name, size, split and a SHA-256 over
        the files' bytes (plus relative paths and labels), so edited images never reuse stale cached features,
        even when `cp -p` / `rsync -a` keep their size and mtime. Hashed once per instance (setup uses it)."""
        if self._dataset_id is None:
            if self.name == "folder":
                tag = self._scan_folder()[2]
            else:
                tag = content_fingerprint(self.data_dir, self._data_files())
                if self._missing_files():  # not final: a later download changes the files
                    return self._id_prefix.format(tag=tag)
            self._dataset_id = self._id_prefix.format(tag=tag)
        return self._dataset_id

    def _check_classes(self, labels: list[int]) -> None:
        # Guidance contrasts classes: a model trained on one class is one no guidance can steer.
        present = sorted(set(labels))
        if len(present) < 2:
            self._too_few_classes([self.class_names[y] for y in present] if self.name == "folder" else present)

    def _too_few_classes(self, present: list) -> None:
        where = (f"the image folder {self._train_root} has {len(present)} class(es) {present}"
                 if self.name == "folder" else f"the {self.name} training files in {self.data_dir} hold "
                 f"label(s) {present}")
        fix = ("put each class's images in its own sub-folder, data_dir/<class>/<image>, with at least 2 "
               "classes holding images" if self.name == "folder"
               else "re-extract the official archive into data_dir (or pass --data.download=true)")
        raise OptionError(_DATA_OPTION, f"{where}; class guidance needs at least 2 classes", fix)

    def _scan_folder(self) -> tuple[list, list | None, str]:
        """(train samples, val samples or None, fingerprint): every image hashed and decoded once, so a corrupt
        file stops setup with its name instead of killing an epoch; memoised per instance."""
        if self._folder is None:
            train = self._folder_samples(self._train_root)
            val = self._folder_samples(self._val_root) if self._val_root is not None else None
            tag, bad = scan_images(self.data_dir, train + (val or []), salt="\n".join(self._class_names or []))
            if bad:
                shown = "; ".join(f"{p} ({why})" for p, why in bad[:5])
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                raise OptionError(_DATA_OPTION, f"{len(bad)} image(s) in {self.data_dir} cannot be read: "
                                  f"{shown}{more}", "replace or delete these files (re-copy them from the "
                                  "source), then run again")
            self._folder = (train, val, tag)
        return self._folder

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (CIFAR names are read from the dataset's meta file)."""
        if self._class_names is None:
            folder, _, _, meta, key, _ = _CIFAR[self.name]
            self._raise_if_missing()
            names = _load_pickle(self.data_dir / folder / meta)[key]
            self._class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        return list(self._class_names)

    def _expected_files(self) -> tuple[Path, list[str]]:
        if self.name in ("mnist", "fashion_mnist"):
            sub = "MNIST" if self.name == "mnist" else "FashionMNIST"  # torchvision's class names
            return self.data_dir / sub / "raw", list(_MNIST_FILES)
        folder, train, test, meta, _, _ = _CIFAR[self.name]
        return self.data_dir / folder, [*train, *test, meta]

    def _data_files(self) -> list[Path]:
        # The expected files plus torchvision's legacy MNIST caches (it prefers those when present).
        directory, files = self._expected_files()
        legacy = ("training.pt", "test.pt") if "mnist" in self.name else ()
        return [directory / f for f in files] + [directory.parent / "processed" / f for f in legacy]

    def _missing_files(self) -> list[str]:
        directory, files = self._expected_files()
        missing = [f for f in files if not (directory / f).is_file()]
        if missing and self.name in ("mnist", "fashion_mnist"):
            # torchvision also accepts its legacy processed/{training,test}.pt caches.
            processed = directory.parent / "processed"
            if all((processed / f).is_file() for f in ("training.pt", "test.pt")):
                return []
        return missing

    def _raise_if_missing(self) -> None:
        missing = self._missing_files()
        if missing:
            directory, _ = self._expected_files()
            raise FileNotFoundError(
                f"{self.name}: missing {', '.join(missing)} in {directory}. Either pass --data.download=true "
                f"(download=True; needs internet) or place the files in {directory} "
                f"({'the .gz archives uncompressed' if 'mnist' in self.name else 'the extracted .tar.gz'})."
            )

    def _folder_roots(self) -> tuple[Path, Path | None]:
        root = self.data_dir
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder {root} not found: expected {root}/<class>/<image> "
                                    f"or {root}/train/<class>/<image> with {root}/val/<class>/<image>.")
        if (root / "train").is_dir() and (root / "val").is_dir():
            return root / "train", root / "val"
        return root, None

    @staticmethod
    def _scan_classes(root: Path) -> list[str]:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"No class sub-folders in {root}: expected {root}/<class>/<image>.")
        return classes

    @staticmethod
    def _first_image_size(root: Path) -> int:
        # Look class by class so a large folder is not listed in full just to find one image.
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(class_dir.rglob("*")):
                if path.suffix.lower() in _IMG_EXTENSIONS:
                    try:
                        with Image.open(path) as img:  # reads the header only
                            return min(img.size)
                    except Exception as err:  # the same one-message error the full scan at setup gives
                        raise OptionError(_DATA_OPTION, f"image {path} cannot be read ({type(err).__name__}: "
                                          f"{err})", "replace or delete it (re-copy it from the source), or "
                                          "set data.image_size") from err
        raise FileNotFoundError(f"No images ({', '.join(_IMG_EXTENSIONS)}) under {root}.")

    def _folder_samples(self, root: Path) -> list[tuple[str, int]]:
        from torchvision.datasets.folder import make_dataset

        extra = self._scan_classes(root) if root != self._train_root else []
        unknown = sorted(set(extra) - set(self._class_names or []))
        if unknown:
            raise ValueError(f"Classes {unknown} in {root} are not in {self._train_root}.")
        class_to_idx = {c: i for i, c in enumerate(self._class_names or [])}
        return make_dataset(str(root), class_to_idx, extensions=_IMG_EXTENSIONS, allow_empty=True)

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        """Download (rank 0 only, by Lightning's rules) when ``download=True`` and files are missing."""
        if not self.download or self.name in ("digits", "folder") or not self._missing_files():
            return
        import torchvision.datasets as tvd
        from torchvision.datasets import utils as tv_utils

        if self.name in ("mnist", "fashion_mnist"):
            cls = tvd.MNIST if self.name == "mnist" else tvd.FashionMNIST
            cls(str(self.data_dir), train=True, download=True)  # fetches and extracts both splits
        else:
            cls = tvd.CIFAR10 if self.name == "cifar10" else tvd.CIFAR100
            # The archive's md5 is checked here, on the real download.
            tv_utils.download_and_extract_archive(cls.url, str(self.data_dir), filename=cls.filename,
                                                  md5=cls.tgz_md5)

    def _load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Official split as (uint8 (N, C, H, W), int64 (N,))."""
        return load_split(self.name, self.data_dir, train)

    def setup(self, stage: str | None = None) -> None:
        """Load both splits once (idempotent) and build the train (augmented) and val datasets."""
        if self._splits is not None:
            return
        if self.name == "digits":
            from sklearn.datasets import load_digits

            bunch = load_digits()  # bundled with scikit-learn: no network
            images = torch.as_tensor(bunch.images, dtype=torch.uint8).unsqueeze(1)  # integer values 0..16
            labels = torch.as_tensor(bunch.target, dtype=torch.long)
            tr, va = stratified_split(labels, self.val_fraction, self.seed)
            self._splits = {"train": (images[tr], labels[tr]), "val": (images[va], labels[va])}
        elif self.name == "folder":
            train, val, _ = self._scan_folder()
            self._check_classes([y for _, y in train])
            if val is None:
                tr, va = stratified_split(torch.tensor([y for _, y in train]), self.val_fraction, self.seed)
                train, val = [train[i] for i in tr.tolist()], [train[i] for i in va.tolist()]
            if not train or not val:
                raise FileNotFoundError(f"Image folder {self.data_dir} gave {len(train)} train and "
                                        f"{len(val)} val images; both must be non-empty.")
            self._splits = {"train": (train,), "val": (val,)}
        else:
            if self._missing_files():
                self.prepare_data()  # only downloads when download=True (e.g. setup() called by hand)
            self._raise_if_missing()
            _ = self.dataset_id  # fingerprint the files now, next to reading them
            splits = {"train": self._load_split(True), "val": self._load_split(False)}
            self._check_classes(splits["train"][1].tolist())
            self._splits = splits
        self.train_dataset = self._make_dataset("train", augment=True)
        self.val_dataset = self._make_dataset("val", augment=False)

    def _make_dataset(self, split: str, augment: bool) -> Dataset:
        if split not in ("train", "val", "test"):
            raise ValueError(f"Unknown split {split!r}; use 'train', 'val' or 'test' (= val).")
        self.setup()
        assert self._splits is not None
        data = self._splits["val" if split == "test" else split]
        flip = augment and self.hflip
        if self.name != "folder":
            max_value = 16 if self.name == "digits" else 255
            return TensorImageDataset(data[0], data[1], max_value, self.image_size, flip)
        import torchvision.transforms as T

        s = self.image_size
        steps = [T.Resize(s), T.CenterCrop(s), *([T.RandomHorizontalFlip()] if flip else []),
                 T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
        return ImageFileDataset(data[0], T.Compose(steps))

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        """shuffle=True: the resumable training loader, its order a pure function of (data seed, epoch) and
        sharded by rank here (Lightning injects no sampler). Every loader draws worker seeds from its own
        generator, so iterating one never moves the global torch RNG that training draws from."""
        common = dict(batch_size=batch_size, drop_last=drop_last, num_workers=self.num_workers,
                      persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                      collate_fn=collate_batch, generator=torch.Generator())
        if not shuffle:
            return DataLoader(dataset, shuffle=False, **common)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return ResumableLoader(dataset, sampler=EpochSampler(dataset, self.seed, rank, world), **common)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        ds = self.train_dataset
        assert ds is not None
        # drop_last keeps batch statistics/logging uniform, but must not empty a tiny dataset.
        drop_last = len(ds) > self.batch_size
        if self.on_device:
            return self._device_loader(ds, drop_last)
        return self._loader(ds, self.batch_size, shuffle=True, drop_last=drop_last)

    def _device_loader(self, ds: Dataset, drop_last: bool) -> DataLoader:
        """Small datasets on the accelerator: the uint8 images move there once; batches never cross the bus."""
        assert isinstance(ds, TensorImageDataset)
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        ds.images, ds.labels = ds.images.to(device), ds.labels.to(device)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        epoch = (lambda: trainer.current_epoch) if trainer is not None else (lambda: 0)
        batches = DeviceBatches(ds, self.batch_size, drop_last, self.seed, epoch, rank, world)
        return ResumableLoader(batches, batch_size=None, num_workers=0, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self.val_dataset is not None
        return self._loader(self.val_dataset, self.batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def eval_dataloader(self, split: str = "train", batch_size: int | None = None) -> DataLoader:
        """Un-augmented, unshuffled loader over a split (for reference statistics)."""
        ds = self._make_dataset(split, augment=False)
        return self._loader(ds, batch_size or self.batch_size, shuffle=False, drop_last=False)

    def split_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """The whole split, un-augmented: (float32 (N, C, S, S) in [-1, 1], int64 (N,))."""
        batches = list(self.eval_dataloader(split, batch_size=1024))
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
