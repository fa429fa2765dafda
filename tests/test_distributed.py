"""Two processes under torchrun with gloo end with the same weights and architecture."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch.utils.data import TensorDataset
    from fastnas.search import SearchConfig, Searcher

    torch.set_num_threads(1)
    method, out, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    config = SearchConfig.create(method, dataset="digits", epochs=1, batch_size=16, init_channels=4, layers=layers,
                                 warmup_epochs=0)
    searcher = Searcher(config, dataset=(TensorDataset(x, y), {"num_classes": 4, "in_channels": 3}),
                        progress=False)
    result = searcher.run()
    torch.save({"state": searcher.net.state_dict(), "history": result.history,
                "arch": [p.detach() for p in searcher.net.arch_parameters()], "world": config.world_size},
               os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, layers",
    # Two cells are both reduction cells: alphas_normal is never used, and DDP must be told.
    [("darts-2nd", 3), ("gdas", 3), ("spos", 3), ("fairnas", 3), ("oneshot", 3), ("darts", 2)],
)
def test_two_gloo_processes_stay_identical(tmp_path, method, layers):
    script = tmp_path / "run_search.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), method, str(tmp_path), str(layers)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for a, b in zip(ranks[0]["arch"], ranks[1]["arch"]):
        assert torch.equal(a, b)
    # The architecture moved: its gradients were applied, on both ranks alike (single-path
    # methods: both ranks ran the same paths, or their weights would differ).
    assert any(h["arch_trained"] for h in ranks[0]["history"])
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k
    strip = lambda hs: [{k: v for k, v in h.items() if k not in ("time_s", "images_per_s")} for h in hs]  # noqa: E731
    # As text, so that the NaN of a metric no epoch measured compares equal.
    assert repr(strip(ranks[0]["history"])) == repr(strip(ranks[1]["history"]))
