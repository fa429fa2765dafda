"""ImageNet-style folders in a search: the recipes' defaults, per-class subsets, keyed augmentation,
the loaders (workers, persistence, cycling), GPU-decoding's host side and the errors.

Every test reads a small folder of real JPEG files written by Pillow."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastnas.data import DatasetError, DatasetNotFoundError, load_dataset
from fastnas.data.pipeline import check_decode, collate_encoded, decode_batch, random_crop_box, sample_key
from fastnas.run.data import EpochShardSampler, SearchLoader, default_workers, search_split
from fastnas.search import SearchConfig, SearchError

CLASSES = ["n001", "n002", "n003"]


def _write_jpegs(folder, per_class, rng):
    for c, cls in enumerate(CLASSES):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 48, size=2))
            pixels = (rng.integers(0, 256, size=(h, w, 3)) // 2 + 60 * c).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / cls / f"{cls}_{i}.JPEG", quality=90)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    _write_jpegs(root / "train", 10, rng)
    _write_jpegs(root / "val", 2, rng)
    return root


def _config(method="pc-darts", **overrides):
    return SearchConfig.create(method, dataset="imagenet", **overrides)


# --- the recipes ----------------------------------------------------------------------


def test_pc_darts_imagenet_recipe_is_train_search_imagenet_py():
    cfg = _config()
    expected = dict(
        epochs=50, batch_size=1024, lr=0.5, lr_min=0.0, lr_warmup_epochs=5, momentum=0.9, weight_decay=3e-4,
        grad_clip=5.0, arch_grad_clip=5.0, arch_lr=6e-3, arch_weight_decay=1e-3, arch_betas=(0.5, 0.999),
        warmup_epochs=35, partial_channels=2, edge_normalization=True, init_channels=16, layers=8,
        fraction=0.125, train_portion=0.8, image_size=224,
    )  # fmt: skip
    assert {k: getattr(cfg, k) for k in expected} == expected
    # Shorter runs scale both warm-ups; the code warms the learning rate up only above batch 256.
    short = _config(epochs=10)
    assert (short.warmup_epochs, short.lr_warmup_epochs) == (7, 1)
    assert _config(batch_size=256).lr_warmup_epochs == 0
    assert _config(lr_warmup_epochs=2, fraction=0.5).lr_warmup_epochs == 2
    # CIFAR keeps its own settings.
    cifar = SearchConfig.create("pc-darts", dataset="cifar10")
    assert (cifar.batch_size, cifar.lr, cifar.lr_warmup_epochs, cifar.fraction) == (256, 0.1, 0, None)
    assert cifar.train_portion == 0.5


def test_darts_imagenet_recipe_is_pc_darts_with_every_channel_and_recompute():
    cfg = _config("darts")
    assert cfg.partial_channels is None and not cfg.edge_normalization and cfg.memory == "recompute"
    assert (cfg.batch_size, cfg.lr, cfg.lr_warmup_epochs, cfg.arch_lr, cfg.warmup_epochs) == (1024, 0.5, 5, 6e-3, 35)
    assert _config("darts", memory="save").memory == "save"
    assert SearchConfig.create("darts", dataset="cifar10").memory == "save"


def test_warmup_then_cosine_schedule():
    from fastnas.search.searcher import _WarmupCosine

    f = _WarmupCosine(5, 50, 0.0)
    assert [f(e) for e in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert f(5) == pytest.approx((1 + math.cos(math.pi * 5 / 50)) / 2)
    assert f(49) > 0


# --- subsets and the split --------------------------------------------------------------


def test_per_class_subsets_are_the_same_files_for_a_seed(jpeg_root):
    cfg = _config(fraction=0.5)
    a, _, _ = load_dataset("imagenet", root=jpeg_root, image_size=16, fraction=0.5, seed=0)
    b, _, _ = load_dataset("imagenet", root=jpeg_root, image_size=16, fraction=0.5, seed=0)
    c, _, _ = load_dataset("imagenet", root=jpeg_root, image_size=16, fraction=0.5, seed=1)
    assert a.samples == b.samples and a.samples != c.samples
    assert sorted(a.labels) == [0] * 5 + [1] * 5 + [2] * 5
    train, val = search_split(a, cfg)
    assert search_split(b, cfg) == (train, val) and not set(train) & set(val)
    # 80/20 within each class: 4 images of each for the weights, 1 for the architecture.
    assert sorted(a.labels[i] for i in train) == [0] * 4 + [1] * 4 + [2] * 4
    assert sorted(a.labels[i] for i in val) == [0, 1, 2]
    tiny, _, _ = load_dataset("imagenet", root=jpeg_root, image_size=16, fraction=0.1, seed=0)
    with pytest.raises(SearchError, match="--fraction"):
        search_split(tiny, cfg)  # one image a class: nothing left for the architecture
    # Every rank draws the same order and takes its share; the shares cover the half.
    shards = [list(EpochShardSampler(train, seed=0, epoch=3, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(train)


# --- augmentation and decoding -----------------------------------------------------------


def test_keyed_crops_repeat_and_the_evaluation_crop(jpeg_root):
    ds, _, info = load_dataset("imagenet", root=jpeg_root, image_size=16)
    key = sample_key(0, 1, 0, 3)
    x = ds[(3, key)][0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and info["image_size"] == 16
    assert torch.equal(x, ds[(3, key)][0])
    assert not torch.equal(x, ds[(3, sample_key(0, 2, 0, 3))][0])
    assert ds[3][0].shape == (3, 16, 16)
    for width, height in ((500, 375), (40, 400), (400, 40), (1, 1)):
        for k in range(20):
            left, top, w, h, _ = random_crop_box(width, height, k)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 and h > 0


def test_gpu_decoding_host_side_matches_pillow(jpeg_root):
    # decode_batch on the CPU: torchvision's JPEG decoder, then crop, resize, flip, normalise.
    ds, _, _ = load_dataset("imagenet", root=jpeg_root, image_size=16)
    encoded = ds.encoded()
    items = [encoded[(i, sample_key(0, 0, 0, i))] for i in (0, 7, 15)]
    assert items[0][0].dim() == 1 and items[0][3].endswith(".JPEG")
    data, boxes, labels, paths = collate_encoded(items)
    x = decode_batch(data, boxes, 16, ds.mean.flatten(), ds.std.flatten(), "cpu", paths=paths)
    pillow = torch.stack([ds[(i, sample_key(0, 0, 0, i))][0] for i in (0, 7, 15)])
    assert x.shape == (3, 3, 16, 16) and labels.tolist() == [0, 0, 1]
    # Two JPEG decoders and two resamplers: close, not equal.
    assert (x - pillow).abs().mean() < 0.15


# --- loaders ------------------------------------------------------------------------------


def _epoch(loader, epoch):
    return [(x.clone(), y.clone()) for x, y in loader.batches(epoch)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_loaders_repeat_with_any_workers_and_across_epochs(jpeg_root):
    ds, _, _ = load_dataset("imagenet", root=jpeg_root, image_size=16)
    idx = list(range(0, len(ds), 2))
    plain = SearchLoader(ds, idx, 4, seed=5)
    workers = SearchLoader(ds, idx, 4, seed=5, workers=2)
    assert workers.loader.persistent_workers and workers.loader.prefetch_factor == 4
    first = _epoch(plain, 1)
    assert len(first) == len(plain) == 3
    assert _same(first, _epoch(workers, 1))
    # The same workers serve the next epoch, in the next epoch's order and crops...
    second = _epoch(workers, 2)
    assert not _same(first, second)
    # ... which a fresh loader (a resumed run) reproduces.
    assert _same(second, _epoch(SearchLoader(ds, idx, 4, seed=5), 2))
    # A shorter half cycles, each pass in its own order.
    it = plain.cycle(1)
    passes = [[next(it)[1].tolist() for _ in range(3)] for _ in range(2)]
    assert passes[0] == [y.tolist() for _, y in first] and passes[0] != passes[1]


def test_default_workers():
    assert default_workers("cifar10") == 0 and default_workers("digits") == 0
    assert 1 <= default_workers("imagenet") <= 12


# --- errors -------------------------------------------------------------------------------


def test_missing_or_empty_folders_and_a_corrupt_jpeg(jpeg_root, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_dataset("imagenet", root=tmp_path / "nowhere")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset("imagenet", root=tmp_path / "empty")
    (tmp_path / "empty" / "train" / "n001").mkdir()
    with pytest.raises(DatasetError, match="n001"):
        load_dataset("imagenet", root=tmp_path / "empty")
    # A corrupt JPEG stops the search with its path (Pillow in the workers, or the GPU decoder).
    ds, _, _ = load_dataset("imagenet", root=jpeg_root, image_size=16)
    bad_path = tmp_path / "bad.JPEG"
    bad_path.write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 10)
    ds.samples = [(bad_path, 0)] + ds.samples[1:]
    with pytest.raises(DatasetError, match="bad.JPEG"):
        ds[0]
    data = [torch.frombuffer(bytearray(bad_path.read_bytes()), dtype=torch.uint8)]
    with pytest.raises(DatasetError, match="bad.JPEG"):
        decode_batch(data, torch.tensor([[0, 0, 4, 4, 0]]), 16, (0.5,) * 3, (0.5,) * 3, "cpu", paths=[str(bad_path)])


def test_decoder_choice_errors():
    check_decode("cpu", "digits", "cpu")
    with pytest.raises(ValueError, match="--device cuda"):
        check_decode("cuda", "imagenet", "cpu")
    with pytest.raises(ValueError, match="held in memory"):
        check_decode("cuda", "cifar10", "cuda")
    with pytest.raises(SearchError, match="unknown --decode"):
        _config(decode="nvjpeg")
    from fastnas.data.pipeline import dali_missing_reason

    if dali_missing_reason() is not None:
        with pytest.raises(ValueError, match="NVIDIA DALI"):
            check_decode("dali", "imagenet", "cuda")


# --- a search --------------------------------------------------------------------------------


def test_pc_darts_searches_a_jpeg_folder_and_resumes_exactly(jpeg_root, tmp_path, monkeypatch):
    from fastnas.search import Searcher

    settings = dict(
        data=str(jpeg_root), epochs=2, batch_size=6, image_size=32, layers=2, init_channels=4, warmup_epochs=1,
        fraction=1.0, workers=0,
    )  # fmt: skip
    # Pictures are not what this test is about, and drawing them takes most of its time.
    monkeypatch.setattr("fastnas.search.searcher.write_search_plots", lambda *a, **k: None)
    monkeypatch.setattr(Searcher, "_write_outputs", lambda self, result: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: threads only contend with the other processes
    try:
        full = Searcher(_config(**settings), out_dir=str(tmp_path / "full"), progress=False)
        records = full.run().history
        original = Searcher._epoch

        def stop_at_second(self, model, net, parts, stage, s, e, g):
            if g == 1:
                raise KeyboardInterrupt
            return original(self, model, net, parts, stage, s, e, g)

        with monkeypatch.context() as m:
            m.setattr(Searcher, "_epoch", stop_at_second)
            with pytest.raises(KeyboardInterrupt):
                Searcher(_config(**settings), out_dir=str(tmp_path / "cut"), progress=False).run()
        resumed = Searcher.resume(str(tmp_path / "cut"), progress=False)
        again = resumed.run().history
    finally:
        torch.set_num_threads(threads)
    # 10 images a class: 8 for the weights (4 batches of 6), 2 for the architecture (1 batch, cycling).
    assert [r["arch_trained"] for r in records] == [False, True]
    assert records[0]["images_per_s"] == pytest.approx(24 / records[0]["time_s"])
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in records)
    strip = lambda hs: [repr({k: v for k, v in h.items() if k not in ("time_s", "images_per_s")}) for h in hs]  # noqa: E731
    assert strip(again) == strip(records)
    resumed_state = resumed.net.state_dict()
    for k, v in full.net.state_dict().items():
        assert torch.equal(v, resumed_state[k]), k


@pytest.mark.requires_cuda
def test_cuda_decoding_matches_the_cpu_decoder_and_feeds_a_loader(jpeg_root):
    ds, _, _ = load_dataset("imagenet", root=jpeg_root, image_size=16)
    encoded = ds.encoded()
    data, boxes, _labels, paths = collate_encoded([encoded[(i, sample_key(0, 0, 0, i))] for i in range(6)])
    mean, std = ds.mean.flatten(), ds.std.flatten()
    on_gpu = decode_batch(data, boxes, 16, mean, std, "cuda", paths=paths)
    on_cpu = decode_batch(data, boxes, 16, mean, std, "cpu", paths=paths)
    assert on_gpu.device.type == "cuda" and (on_gpu.cpu() - on_cpu).abs().mean() < 0.05
    loader = SearchLoader(ds, range(12), 4, seed=0, workers=1, decode="cuda", device="cuda")
    batches = list(loader.batches(0))
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 16, 16) and batches[0][0].device.type == "cuda"
    again = list(SearchLoader(ds, range(12), 4, seed=0, decode="cuda", device="cuda").batches(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
