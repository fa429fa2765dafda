"""Datasets from local files: scikit-learn's digits, CIFAR-10/100 pickles, ImageNet-style folders."""

from fastnas.data.datasets import DATASETS, DatasetError, DatasetNotFoundError, info_field, load_dataset

__all__ = ["DATASETS", "DatasetError", "DatasetNotFoundError", "info_field", "load_dataset"]
