"""What the search tests share: a tiny dataset and configuration, running a search on them,
comparing results, stopping a search at an epoch, and training two models side by side.

A test file imports these from here, never from another test file.
"""

import torch
from torch.utils.data import TensorDataset

from fastnas.search import SearchConfig, Searcher

INFO = {"num_classes": 4, "in_channels": 3, "image_size": 8}


def tiny_dataset(n=32, seed=0, poison=False):
    """``n`` random 8x8 RGB images of 4 classes, and the dataset's info; ``poison``: every pixel NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    if poison:
        x[:] = float("nan")
    y = torch.randint(0, INFO["num_classes"], (n,), generator=g)
    return TensorDataset(x, y), INFO


def tiny_config(method="darts", **overrides):
    """C=4, 3 cells, batch 8 on 16 images per side of the split: 2 steps an epoch.

    P-DARTS runs three stages of 3 cells, one epoch each; GDAS two epochs. ``overrides`` win."""
    kw = dict(epochs=1, batch_size=8, init_channels=4, layers=3, warmup_epochs=0)
    if method == "p-darts":
        kw.update(epochs=3, stage_layers=(3, 3, 3))
    if method == "gdas":
        kw.update(epochs=2)
    kw.update(overrides)
    return SearchConfig.create(method, dataset="digits", **kw)


def search(config, out_dir=None, dataset=None, **kwargs):
    """Run a search on ``dataset`` (the tiny dataset by default): (result, searcher)."""
    searcher = Searcher(config, out_dir=out_dir, dataset=dataset or tiny_dataset(), progress=False, **kwargs)
    return searcher.run(), searcher


def run(config, out_dir=None, **kwargs):
    """Run a search on the tiny dataset: (result, the searched network)."""
    result, searcher = search(config, out_dir, **kwargs)
    return result, searcher.net


def losses(history):
    return [(h["train_loss"], h["search_val_loss"]) for h in history]


def assert_state_close(a, b, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


class _Interrupt(KeyboardInterrupt):
    pass


def interrupt_at(monkeypatch, global_epoch):
    """Make the search stop with Ctrl-C at the start of ``global_epoch`` (0-based)."""
    original = Searcher._epoch

    def epoch(self, model, net, parts, stage, s, e, g):
        if g == global_epoch:
            raise _Interrupt()
        return original(self, model, net, parts, stage, s, e, g)

    monkeypatch.setattr(Searcher, "_epoch", epoch)


def strip_times(history):
    return [{k: v for k, v in h.items() if k not in ("time_s", "images_per_s")} for h in history]


def assert_steps_alike(ref, fast, ref_opts, fast_opts, steps, batch, step, dtype, tol):
    """Train ``ref`` and ``fast`` side by side for ``steps`` steps on the same batches
    (``batch(i, dtype=)``, ``step(model, opts, x, y, i)``): logits, losses, every gradient
    and the random numbers drawn after each step agree."""
    for i in range(steps):
        x, y = batch(i, dtype=dtype)
        l_ref, loss_ref, g_ref, r_ref = step(ref, ref_opts, x, y, i)
        l_fast, loss_fast, g_fast, r_fast = step(fast, fast_opts, x, y, i)
        torch.testing.assert_close(l_fast, l_ref, **tol)
        torch.testing.assert_close(loss_fast, loss_ref, **tol)
        assert g_fast.keys() == g_ref.keys()
        for name in g_ref:
            torch.testing.assert_close(g_fast[name], g_ref[name], **tol, msg=lambda m, n=name: f"grad of {n}: {m}")
        torch.testing.assert_close(r_fast, r_ref, rtol=0, atol=0)
