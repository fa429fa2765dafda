"""A search on several nodes: two torchrun agents of one process each (node 0 and node 1),
joined by a c10d rendezvous on loopback with gloo, as README's multi-node recipe runs them.

Ranks, shards and reductions are the same as those of one agent of two processes, and each
rank's arithmetic does not depend on where it runs, so the two agree exactly; a run stopped
after an epoch and resumed on the two nodes follows the same trajectory exactly too.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smallest search: 3 cells of 4 channels (fewer leave no normal cell, whose weights DDP
# then finds unused) on 10% of the digits (66 images a half, 4
# steps of 8 images per rank and epoch).
TINY = ["--method", "darts", "--dataset", "digits", "--fraction", "0.1", "--epochs", "2", "--batch-size", "16",
        "--layers", "3", "--init-channels", "4", "--threads", "1", "--no-progress"]  # fmt: skip
TIMEOUT_S = 180

# `python SCRIPT STOP_EPOCH fastnas-arguments...`: fastnas search, stopped with Ctrl-C at the
# start of global epoch STOP_EPOCH (0-based), as an interrupted run is.
STOP_SCRIPT = textwrap.dedent(
    """
    import sys
    from fastnas.cli import main
    from fastnas.search import Searcher

    stop, argv = int(sys.argv[1]), sys.argv[2:]
    original = Searcher._epoch

    def epoch(self, model, net, parts, stage, s, e, g):
        if g == stop:
            raise KeyboardInterrupt
        return original(self, model, net, parts, stage, s, e, g)

    Searcher._epoch = epoch
    sys.exit(main(argv))
    """
)

# `python SCRIPT OUT fastnas-arguments...`: records in OUT/rank<r>.json what rank r reads (the
# image files, the split, the shard of each half that its samplers give in the first two
# epochs), checks that a value the ranks disagree on is refused, and stops before a step
# (exit status 0).
SEE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from fastnas.cli import main
    from fastnas.search import Searcher, SearchError
    from fastnas.run import data
    from fastnas.run.distributed import data_fingerprint

    out, argv = sys.argv[1], sys.argv[2:]
    shards = []
    sampler_iter = data.EpochShardSampler.__iter__

    def record(self):
        mine = [i if isinstance(i, int) else i[0] for i in sampler_iter(self)]
        shards.append({"indices": self.indices, "seed": self.seed, "epoch": self.epoch,
                       "repeat": getattr(self, "repeat", 0), "shard": mine})
        return sampler_iter(self)

    def epoch(self, model, net, parts, stage, s, e, g):
        data.EpochShardSampler.__iter__ = record
        for k in range(2):
            loaders = self._epoch_loaders(k)
            # Loaders, or (steps, iterators of batches): a first batch makes each sampler draw.
            for it in loaders[1] if isinstance(loaders, tuple) else [iter(x) for x in loaders]:
                next(it)
        rank = self.dist.rank
        seen = {
            "world": self.dist.world_size,
            "files": [os.path.relpath(str(p), self.config.data) for p, _ in self.train_set.samples],
            "labels": [int(y) for _, y in self.train_set.samples],
            "train_idx": list(self.train_idx),
            "val_idx": list(self.val_idx),
            "fingerprint": data_fingerprint(self.train_set, self.train_idx, self.val_idx),
            "shards": shards,
        }
        try:
            self.dist.check_same("a test value", str(rank))
        except SearchError as exc:
            seen["refused"] = str(exc)
        with open(os.path.join(out, "rank%d.json" % rank), "w") as f:
            json.dump(seen, f)
        raise Seen

    class Seen(Exception):
        pass

    Searcher._epoch = epoch
    try:
        main(argv)
    except Seen:
        sys.exit(0)
    sys.exit(1)
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    path = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _launch(agents, cwd):
    """Run each torchrun command line of ``agents`` at once; returns [(returncode, output)].

    Each agent leads its own process group, killed whole on the way out, so that an agent
    left waiting for a peer that failed never outlives the test.
    """
    procs = []
    try:
        for i, cmd in enumerate(agents):
            log = open(os.path.join(cwd, f"agent{i}.log"), "w+")
            procs.append((subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))  # fmt: skip
        results = []
        for proc, log in procs:
            try:
                proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
            log.seek(0)
            results.append((proc.returncode, log.read()))
        return results
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def _two_nodes(worker, args_per_node, cwd):
    """torchrun on two "nodes" of one process each, node 0 hosting the c10d rendezvous."""
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "fastnas-test",
         "--rdzv_conf", f"is_host={int(node == 0)}", "--max_restarts", "0", *worker, *args]
        for node, args in enumerate(args_per_node)
    ]  # fmt: skip
    return _launch(agents, cwd)


def _one_node(worker, args, cwd):
    """torchrun on one node of two processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker, *args]
    return _launch([cmd], cwd)


def _check(results):
    for rc, output in results:
        assert rc == 0, output[-4000:]


def _log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # As text, so that the NaN of a metric no epoch measured compares equal.
    return [repr({k: v for k, v in r.items() if k not in ("time_s", "images_per_s")}) for r in records]


def _model(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_two_nodes_stop_resume_and_equal_one_node(tmp_path):
    # The reference: one node of two processes, uninterrupted.
    _check(_one_node(["-m", "fastnas"], ["search", *TINY, "--out", "one-node"], tmp_path))

    # Two nodes, each with its own --out (no shared folder), stopped after the first epoch.
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    results = _two_nodes([str(script), "1"], [["search", *TINY, "--out", f"node{n}"] for n in range(2)], tmp_path)
    assert all(rc != 0 for rc, _ in results)
    written = [n for n in range(2) if (tmp_path / f"node{n}").exists()]
    assert len(written) == 1, "rank 0 alone writes: one node's folder"
    assert "interrupted" in results[written[0]][1]
    assert len(_log(tmp_path / f"node{written[0]}")) == 1

    # Every node reads the checkpoint to resume: copy the folder to the other node's path.
    shutil.copytree(tmp_path / f"node{written[0]}", tmp_path / f"node{1 - written[0]}")
    results = _two_nodes(["-m", "fastnas"], [["search", "--resume", f"node{n}", "--no-progress"] for n in range(2)],
                         tmp_path)  # fmt: skip
    _check(results)
    # The rendezvous may give rank 0 to the other node this time; its folder holds the run.
    main = [n for n in range(2) if "genotype:" in results[n][1]]
    assert len(main) == 1
    assert "train it from scratch: torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d" in results[main[0]][1]
    out = tmp_path / f"node{main[0]}"
    assert {"checkpoint.pt", "log.jsonl", "genotype.json", "cells.png"} <= set(os.listdir(out))
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["config"]["world_size"] == 2

    # The same trajectory as one node's uninterrupted run, exactly: each epoch's losses,
    # accuracies and architecture weights, the final weights and the genotype.
    reference = tmp_path / "one-node"
    assert len(_log(out)) == 2
    assert _log(out) == _log(reference)
    model, reference_model = _model(out), _model(reference)
    assert model.keys() == reference_model.keys()
    for k, v in model.items():
        assert torch.equal(v, reference_model[k]), k
    with open(out / "genotype.json") as f, open(reference / "genotype.json") as g:
        assert json.load(f) == json.load(g)


def _image_folder(root, classes=3, per_class=10):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class if split == "train" else 1):
                pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"img{i}.png")


@pytest.mark.slow
def test_every_rank_reads_the_same_subset_split_and_order(tmp_path):
    _image_folder(tmp_path / "images")
    script = tmp_path / "see.py"
    script.write_text(SEE_SCRIPT)
    args = ["search", "--dataset", "imagenet", "--data", str(tmp_path / "images"), "--fraction", "0.6",
            "--train-portion", "0.5", "--image-size", "8", "--batch-size", "2", "--layers", "3",
            "--init-channels", "4", "--workers", "0", "--threads", "1", "--no-progress", "--out", "run"]  # fmt: skip
    _check(_one_node([str(script), str(tmp_path)], args, tmp_path))
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0]["world"] == seen[1]["world"] == 2
    # --fraction 0.6 of 10 images keeps 6 of each of the 3 classes, the same files on every rank.
    for key in ("files", "labels", "train_idx", "val_idx", "fingerprint"):
        assert seen[0][key] == seen[1][key], key
    assert len(seen[0]["files"]) == 18 and sorted(seen[0]["labels"]) == sorted(list(range(3)) * 6)
    # Both ranks drew the same samplers (both halves, two epochs); the shards of each
    # partition one order of its half (wrapped to equal lengths), a new order each epoch.
    halves = sorted([seen[0]["train_idx"], seen[0]["val_idx"]])
    draws = [[(d["seed"], d["epoch"], d["repeat"]) for d in s["shards"]] for s in seen]
    assert draws[0] == draws[1] and {epoch for _, epoch, _ in draws[0]} == {0, 1}
    assert len({seed for seed, _, _ in draws[0]}) == 2
    orders = {}
    for d0, d1 in zip(seen[0]["shards"], seen[1]["shards"]):
        assert d0["indices"] == d1["indices"] and sorted(d0["indices"]) in [sorted(h) for h in halves]
        assert len(d0["shard"]) == len(d1["shard"]) == -(-len(d0["indices"]) // 2)
        order = [i for pair in zip(d0["shard"], d1["shard"]) for i in pair][: len(d0["indices"])]
        assert sorted(order) == sorted(d0["indices"])
        orders.setdefault(d0["seed"], []).append(order)
    assert all(len(o) >= 2 and o[0] != o[-1] for o in orders.values())
    # Both ranks refuse a value they disagree on, each naming rank 1.
    assert all("rank 1 on" in s["refused"] for s in seen)


def test_a_node_without_the_checkpoint_says_so_on_its_console(tmp_path, monkeypatch, capsys):
    from fastnas.cli import EXIT_ERROR, main

    # The first process of a second node, as torchrun describes it.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["search", "--resume", str(tmp_path / "run"), "--no-progress"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "error (rank 1): no checkpoint at" in err and "copy rank 0's folder to the same path on every node" in err
    # Its other processes stay silent, as rank 0's do on one node.
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["search", "--resume", str(tmp_path / "run"), "--no-progress"]) == EXIT_ERROR
    assert capsys.readouterr().err == ""


def test_data_fingerprint_names_what_every_rank_must_share(tmp_path):
    from torch.utils.data import TensorDataset

    from fastnas.data import load_dataset
    from fastnas.run.data import split_indices
    from fastnas.run.distributed import data_fingerprint

    def fingerprint(root, fraction=0.6, seed=0):
        train_set = load_dataset("imagenet", root=str(root), image_size=8, fraction=fraction, seed=seed)[0]
        return data_fingerprint(train_set, *split_indices(len(train_set), 0.5, seed))

    for node in ("a", "b"):
        _image_folder(tmp_path / node)
    # The same images at another path (another node's mount) are the same data.
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "a", fraction=0.5)
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "a", seed=1)
    (tmp_path / "b" / "train" / "class1" / "img0.png").rename(tmp_path / "b" / "train" / "class1" / "img99.png")
    assert fingerprint(tmp_path / "a", fraction=1.0) != fingerprint(tmp_path / "b", fraction=1.0)

    x, y = torch.rand(6, 1, 2, 2), torch.arange(6) % 2
    same = data_fingerprint(TensorDataset(x, y), [0, 1, 2], [3, 4, 5])
    assert same == data_fingerprint(TensorDataset(x.clone(), y.clone()), [0, 1, 2], [3, 4, 5])
    assert same != data_fingerprint(TensorDataset(x, y), [0, 1, 3], [2, 4, 5])
    x[5, 0, 1, 1] += 1
    assert same != data_fingerprint(TensorDataset(x, y), [0, 1, 2], [3, 4, 5])


def test_the_train_command_a_search_prints_keeps_its_nodes():
    from fastnas.cli import _train_command

    assert _train_command("out", "cuda", 16, 8) == (
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT -m fastnas train out "
        "--device cuda"
    )
    assert _train_command("out", "cuda", 2, 2) == "torchrun --nproc_per_node 2 -m fastnas train out --device cuda"
