import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fastnas.data import DatasetError, DatasetNotFoundError, load_dataset


def _write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_batch(n, num_classes, label_key, rng):
    return {
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key.encode(): rng.integers(0, num_classes, size=n).tolist(),
    }


@pytest.fixture
def cifar10_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        _write_pickle(folder / f"data_batch_{i}", _cifar_batch(4, 10, "labels", rng))
    _write_pickle(folder / "test_batch", _cifar_batch(3, 10, "labels", rng))
    return folder


def _write_images(folder, classes, per_class, size=(12, 10), ext=".png"):
    rng = np.random.default_rng(1)
    for cls in classes:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / cls / f"img{i}{ext}")


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "imagenet"
    _write_images(root / "train", ["cat", "dog", "eel"], per_class=10)
    _write_images(root / "val", ["cat", "dog", "eel"], per_class=2, ext=".jpg")
    return root


def test_digits_are_normalised_rgb_with_a_fixed_split():
    train, test, info = load_dataset("digits")
    assert info["num_classes"] == 10 and info["in_channels"] == 3 and info["image_size"] == 16
    assert len(train) + len(test) == 1797 and len(test) == 359
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and isinstance(y, int)
    assert torch.equal(x[0], x[1])
    images = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(images.mean()) < 1e-3 and abs(images.std() - 1) < 1e-2
    train2, test2, _ = load_dataset("digits", seed=5)
    assert test2.labels == test.labels and torch.equal(test2[7][0], test[7][0])


def test_digits_fraction_and_size():
    train, _, info = load_dataset("digits", image_size=8, fraction=0.1, seed=3)
    assert info["image_size"] == 8 and train[0][0].shape == (3, 8, 8)
    assert 130 <= len(train) <= 150 and set(train.labels) == set(range(10))
    again, _, _ = load_dataset("digits", image_size=8, fraction=0.1, seed=3)
    assert again.labels == train.labels


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10_reads_the_pickle_folder_or_its_parent(cifar10_dir, use_parent):
    root = cifar10_dir.parent if use_parent else cifar10_dir
    train, test, info = load_dataset("cifar10", root=root)
    assert (len(train), len(test)) == (20, 3)
    assert info == {"num_classes": 10, "in_channels": 3, "image_size": 32}
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    with open(cifar10_dir / "data_batch_1", "rb") as f:
        batch = pickle.load(f)
    raw = torch.tensor(batch[b"data"][0], dtype=torch.float32).view(3, 32, 32) / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    assert y == batch[b"labels"][0]
    small, _, info = load_dataset("cifar10", root=root, image_size=16)
    assert small[0][0].shape == (3, 16, 16) and info["image_size"] == 16


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    _write_pickle(folder / "train", _cifar_batch(6, 100, "fine_labels", rng))
    _write_pickle(folder / "test", _cifar_batch(2, 100, "fine_labels", rng))
    train, test, info = load_dataset("cifar100", root=tmp_path)
    assert info["num_classes"] == 100 and (len(train), len(test)) == (6, 2)


def test_missing_cifar_says_what_was_expected_where(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data_batch_1.*test_batch") as err:
        load_dataset("cifar10", root=tmp_path)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="root="):
        load_dataset("cifar10")


def test_malformed_cifar_files_are_reported(cifar10_dir):
    (cifar10_dir / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3.*not a CIFAR"):
        load_dataset("cifar10", root=cifar10_dir)
    _write_pickle(cifar10_dir / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DatasetError, match=r"\(N, 3072\)"):
        load_dataset("cifar10", root=cifar10_dir)
    _write_pickle(cifar10_dir / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]})
    with pytest.raises(DatasetError, match="label 12"):
        load_dataset("cifar10", root=cifar10_dir)


def test_image_folder_decodes_resizes_and_labels(image_root):
    train, test, info = load_dataset("imagenet", root=image_root, image_size=8)
    assert info["classes"] == ["cat", "dog", "eel"] and info["num_classes"] == 3
    assert (len(train), len(test)) == (30, 6)
    x, y = test[5]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 2


def test_image_folder_fraction_is_per_class_and_seeded(image_root):
    a, _, _ = load_dataset("imagenet", root=image_root, image_size=8, fraction=0.2, seed=0)
    b, _, _ = load_dataset("imagenet", root=image_root, image_size=8, fraction=0.2, seed=0)
    c, _, _ = load_dataset("imagenet", root=image_root, image_size=8, fraction=0.2, seed=1)
    assert sorted(a.labels) == [0, 0, 1, 1, 2, 2]
    assert a.samples == b.samples and a.samples != c.samples
    with pytest.raises(DatasetError, match="fraction"):
        load_dataset("imagenet", root=image_root, fraction=1.5)


def test_image_folder_errors(image_root, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="val"):
        load_dataset("imagenet", root=tmp_path / "nowhere")
    (image_root / "train" / "cat" / "img0.png").write_bytes(b"garbage")
    train, _, _ = load_dataset("imagenet", root=image_root, image_size=8)
    with pytest.raises(DatasetError, match="img0.png"):
        train[0]
    (image_root / "train" / "fox").mkdir()
    with pytest.raises(DatasetError, match="fox"):
        load_dataset("imagenet", root=image_root)


def test_unknown_dataset_and_bad_size():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset("digits", image_size=0)


class _RunsCode:
    """Unpickling this calls os.system: what a crafted data file could do."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_files_pickled_either_way_load(tmp_path, protocol):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(_cifar_batch(3, 10, "labels", rng), f, protocol=protocol)
    train, test, _ = load_dataset("cifar10", root=folder)
    assert len(train) == 15 and len(test) == 3


@pytest.mark.parametrize("payload", [_RunsCode(), {b"data": _RunsCode(), b"labels": [0]}])
def test_a_cifar_file_that_would_run_code_is_refused(cifar10_dir, tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    _write_pickle(cifar10_dir / "data_batch_3", payload)
    with pytest.raises(DatasetError, match=r"data_batch_3 is not a CIFAR python-pickle file.*(posix|os)\.system"):
        load_dataset("cifar10", root=cifar10_dir)
    assert not (tmp_path / "pwned").exists()
