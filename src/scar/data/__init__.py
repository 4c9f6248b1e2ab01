"""Data layer: image sets, datasets, forget specifications and surrogate sources."""

from scar.data.base import (
    Augment,
    Batch,
    BatchLoader,
    ImageSet,
    InputSpec,
    SubsetImages,
    TensorImages,
    normalize,
    resize_images,
)
from scar.data.datasets import (
    DATASETS,
    DEFAULT_DATASET,
    KNOWN_DATASETS,
    SYSTEM_LOCATIONS,
    DatasetBundle,
    DatasetInfo,
    load_dataset,
)
from scar.data.forget import (
    ForgetSpec,
    Splits,
    load_indices,
    make_splits,
    retain_indices,
    sample_forget_indices,
    save_indices,
)
from scar.data.surrogates import SURROGATES, build_surrogate_subset, load_surrogate

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "KNOWN_DATASETS",
    "SURROGATES",
    "SYSTEM_LOCATIONS",
    "Augment",
    "Batch",
    "BatchLoader",
    "DatasetBundle",
    "DatasetInfo",
    "ForgetSpec",
    "ImageSet",
    "InputSpec",
    "Splits",
    "SubsetImages",
    "TensorImages",
    "build_surrogate_subset",
    "load_dataset",
    "load_indices",
    "load_surrogate",
    "make_splits",
    "normalize",
    "resize_images",
    "retain_indices",
    "sample_forget_indices",
    "save_indices",
]
