"""Long-tailed training sets, validation carving, class ranks, groups and shots.

The long-tail formula is LDAM-DRW's `IMBALANCECIFAR10/100.get_img_num_per_cls`: class k of K
keeps `int(n_max * f**(k/(K-1)))` images (exp) or `n_max` / `int(n_max * f)` for the first /
second half of the labels (step). Which images a class keeps is a seeded shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ltexp import LtexpError
from ltexp.data.sources import ImageSource

IMB_TYPES = ("exp", "step")
# holdout: balanced validation from training images the long tail left out; paper: 9:1 split of test.
VAL_SOURCES = ("holdout", "paper")
# Shot boundaries in training images per class (Liu et al. 2019, OLTR): many > 100, few < 20.
MANY_SHOT_MIN = 101
FEW_SHOT_MAX = 19


def long_tail_counts(n_max: int, num_classes: int, imb_type: str, imb_factor: float) -> list[int]:
    """Images kept per class (label order) for a balanced source of `n_max` images per class."""
    if imb_type == "exp":
        return [int(n_max * imb_factor ** (k / (num_classes - 1))) if num_classes > 1 else n_max
                for k in range(num_classes)]
    if imb_type == "step":
        half = num_classes // 2
        return [n_max if k < half else int(n_max * imb_factor) for k in range(num_classes)]
    raise LtexpError(f"unknown --imb-type {imb_type!r}: allowed are exp, step")


def default_split_at(num_classes: int, num_groups: int = 2) -> tuple[int, ...]:
    """Ranks where groups 1..G-1 start, giving groups of (nearly) equal numbers of classes."""
    if num_groups > num_classes:
        raise LtexpError(f"--num-groups {num_groups} is more than the {num_classes} classes: "
                         f"use 2..{num_classes} (one expert per group, at least one class each)")
    return tuple(int(g * num_classes / num_groups) for g in range(1, num_groups))


def validate_split_at(split_at: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """Check that group start ranks are strictly increasing inside 1..K-1 (so no group is empty)."""
    split = tuple(int(s) for s in split_at)
    if not split:
        raise LtexpError("--split-at is empty: give at least one rank in 1..K-1")
    if any(s < 1 or s > num_classes - 1 for s in split):
        raise LtexpError(f"--split-at {','.join(map(str, split))} is out of range: ranks must lie in 1..{num_classes - 1}")
    if any(b <= a for a, b in zip(split, split[1:])):
        raise LtexpError(f"--split-at {','.join(map(str, split))} must be strictly increasing (no empty group)")
    return split


@dataclass(frozen=True)
class ClassInfo:
    """Per-class facts every metric and method needs, derived from the training counts."""

    class_names: tuple[str, ...]
    train_counts: np.ndarray  # (K,) training images per class, label order

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def rank_order(self) -> np.ndarray:
        """Classes sorted by training count, descending, ties broken by label: rank -> class."""
        return np.lexsort((np.arange(self.num_classes), -self.train_counts))

    @property
    def rank_of(self) -> np.ndarray:
        """Class -> rank (0 = most training images)."""
        ranks = np.empty(self.num_classes, dtype=np.int64)
        ranks[self.rank_order] = np.arange(self.num_classes)
        return ranks

    def group_of(self, split_at: Sequence[int] | None = None) -> np.ndarray:
        """Class -> group index for groups starting at ranks `split_at` (default: head / tail halves)."""
        if split_at is None and self.num_classes < 2:
            return np.zeros(self.num_classes, dtype=np.int64)  # one class (a one-class expert): all head
        split = validate_split_at(split_at if split_at is not None else default_split_at(self.num_classes),
                                  self.num_classes)
        return np.searchsorted(np.asarray(split), self.rank_of, side="right").astype(np.int64)

    @property
    def is_head(self) -> np.ndarray:
        """Boolean (K,): the class is in the head half of the default two-group split."""
        return self.group_of() == 0

    @property
    def shot(self) -> np.ndarray:
        """`many` (>100 training images), `medium` (20-100) or `few` (<20) per class."""
        return np.where(self.train_counts >= MANY_SHOT_MIN, "many",
                        np.where(self.train_counts <= FEW_SHOT_MAX, "few", "medium"))


@dataclass(frozen=True)
class LongTailData:
    """Training (long-tailed), validation and test images as uint8 NHWC numpy arrays."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    info: ClassInfo
    # Indices into the source's train / test arrays, kept so tests can prove disjointness.
    train_index: np.ndarray
    val_index: np.ndarray
    test_index: np.ndarray
    val_from_test: bool

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # (H, W, C)

    def counts_table(self):
        """Per-class train / val / test counts with rank, group and shot (a pandas DataFrame)."""
        import pandas as pd

        info = self.info
        k = info.num_classes
        table = pd.DataFrame({
            "label": np.arange(k),
            "class": list(info.class_names),
            "rank": info.rank_of,
            "train": info.train_counts,
            "val": np.bincount(self.val_labels, minlength=k),
            "test": np.bincount(self.test_labels, minlength=k),
            "group": np.where(info.is_head, "head", "tail"),
            "shot": info.shot,
        })
        return table.sort_values("rank").reset_index(drop=True)


def _fewest_to_keep(n_max: int, num_classes: int, imb_type: str, imb_factor: float) -> int | None:
    """The smallest balanced pool (images per class) from which the long-tail formula leaves every
    class at least one image, or None when even `n_max` per class does not."""
    def enough(n: int) -> bool:
        return min(long_tail_counts(n, num_classes, imb_type, imb_factor)) >= 1

    if not enough(n_max):
        return None
    low, high = 1, n_max  # counts never fall as the pool grows: bisect for the first that works
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid + 1, high)
    return low


def _holdout_per_class(source: ImageSource, available: np.ndarray, val_per_class: int, imb_type: str,
                       imb_factor: float) -> int:
    """Validation images to set aside per class, or one `LtexpError` naming the largest value allowed.

    A balanced source gives exactly `val_per_class`, as long as its rarest class keeps enough
    training images for the long-tail formula to leave every class one. A folder's rarest class
    bounds the (balanced) holdout instead: it takes at most all but one of that class's images.
    """
    if val_per_class < 1:
        raise LtexpError(f"--val-per-class {val_per_class}: --val-source holdout needs at least 1 "
                         f"validation image per class")
    rarest = int(available.min())
    rarest_name = source.class_names[int(np.argmin(available))]
    if not source.balanced:
        if rarest < 2:
            raise LtexpError(f"--val-source holdout needs at least 2 training images in every class (class "
                             f"{rarest_name!r} has {rarest}): one for validation, one for training; "
                             f"use --val-source paper")
        return min(val_per_class, rarest - 1)
    # An imbalance no pool size satisfies is reported after the carve, naming --imb-factor.
    keep = _fewest_to_keep(rarest, len(available), imb_type, imb_factor) or 1
    most = rarest - keep
    if val_per_class <= most:
        return val_per_class
    why = (f"--imb-type {imb_type} --imb-factor {imb_factor} needs {keep} left for training to leave every class "
           f"an image" if keep > 1 else "every class must keep a training image")
    if most < 1:
        raise LtexpError(f"--val-source holdout has no images to spare in {source.name}: its classes have "
                         f"{rarest} training images each and {why}; use --val-source paper or a larger --imb-factor")
    raise LtexpError(f"--val-per-class {val_per_class} is more than {source.name} allows: at most {most}, as its "
                     f"classes have {rarest} training images each and {why}; use --val-per-class {most} or less, "
                     f"or --val-source paper")


def build_long_tail(source: ImageSource, imb_type: str, imb_factor: float, val_source: str,
                    val_per_class: int, seed: int) -> LongTailData:
    """Subsample the source's training pool into a long-tailed set and carve validation.

    `val_source="holdout"`: `val_per_class` images of every class are set aside from the
    training pool first; the long-tail formula then runs on what remains, with `n_max` = the
    remaining images per class (so CIFAR-10 with 100 per class gives n_max = 4,900 and the exact
    imbalance factor). `val_source="paper"`: the whole pool is subsampled (CIFAR-10 exp 0.01
    keeps exactly [5000, 2997, ..., 50]) and a seeded 9:1 split of the test set gives
    validation : test.

    A folder source (`balanced=False`) keeps its own counts when `imb_factor=1`; otherwise the
    formula's count is capped by what each class has.
    """
    rng = np.random.default_rng(seed)
    k = source.num_classes
    per_class = [rng.permutation(np.flatnonzero(source.train_labels == c)) for c in range(k)]
    available = np.array([len(p) for p in per_class])
    if (available == 0).any():
        empty = [source.class_names[c] for c in np.flatnonzero(available == 0)]
        raise LtexpError(f"class {empty[0]!r} has no training images: every class needs at least one")

    if val_source == "holdout":
        reserve = _holdout_per_class(source, available, val_per_class, imb_type, imb_factor)
        val_idx = np.concatenate([p[:reserve] for p in per_class])
        pools = [p[reserve:] for p in per_class]
    else:
        val_idx = np.empty(0, dtype=np.int64)
        pools = per_class
    pool_sizes = np.array([len(p) for p in pools])

    if source.balanced:
        counts = long_tail_counts(int(pool_sizes.min()), k, imb_type, imb_factor)
    elif imb_factor >= 1:
        counts = pool_sizes.tolist()
    else:
        # Apply the shape to the user's data in label order, never asking for more than exists.
        counts = np.minimum(long_tail_counts(int(pool_sizes.max()), k, imb_type, imb_factor), pool_sizes).tolist()
    zero = [source.class_names[c] for c, n in enumerate(counts) if n < 1]
    if zero:
        raise LtexpError(
            f"class {zero[0]!r} has 0 training images after --imb-type {imb_type} --imb-factor {imb_factor}: "
            f"use a larger --imb-factor (every class needs at least one image)")
    train_idx = np.concatenate([pool[:n] for pool, n in zip(pools, counts)])

    test_idx = np.arange(len(source.test_labels))
    val_images, val_labels = source.train_images[val_idx], source.train_labels[val_idx]
    if val_source == "paper":
        # The paper's protocol: validation : test = 9 : 1, a seeded split of the official test set.
        perm = rng.permutation(len(source.test_labels))
        n_val = int(round(0.9 * len(perm)))
        val_idx, test_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        val_images, val_labels = source.test_images[val_idx], source.test_labels[val_idx]

    info = ClassInfo(source.class_names, np.asarray(counts, dtype=np.int64))
    return LongTailData(
        train_images=source.train_images[train_idx], train_labels=source.train_labels[train_idx],
        val_images=val_images, val_labels=val_labels,
        test_images=source.test_images[test_idx], test_labels=source.test_labels[test_idx],
        info=info, train_index=train_idx, val_index=val_idx, test_index=test_idx,
        val_from_test=val_source == "paper",
    )
