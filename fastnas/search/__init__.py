"""Weight-sharing architecture search: DARTS (first and second order), PC-DARTS, P-DARTS, GDAS,
and the single-path and one-shot supernets of SPOS, FairNAS and Bender et al.

    from fastnas.search import SearchConfig, search
    result = search(SearchConfig.create("pc-darts", dataset="cifar10", data="~/data/cifar-10"), out_dir="run")
    print(result.genotype)

``Searcher.resume(out_dir)`` continues an interrupted search exactly where its
last checkpoint left it. A single-path search ends with a trained supernet;
``fastnas.tools.selection.select`` searches over it and
``fastnas.tools.rank_eval.rank_eval`` measures how well it ranks architectures.
"""

from fastnas.errors import CheckpointError, NonFiniteLossError, OutOfMemoryError, SearchError
from fastnas.search.config import DATASETS, SPACES, SearchConfig
from fastnas.search.methods import METHODS
from fastnas.search.methods.p_darts import prune_candidates
from fastnas.search.searcher import Searcher, SearchResult, build_supernet, search

__all__ = [
    "DATASETS",
    "METHODS",
    "SPACES",
    "CheckpointError",
    "NonFiniteLossError",
    "OutOfMemoryError",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "Searcher",
    "build_supernet",
    "prune_candidates",
    "search",
]
