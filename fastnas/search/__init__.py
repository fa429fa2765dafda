"""DARTS-family architecture search: DARTS (first and second order), PC-DARTS, P-DARTS, GDAS.

    from fastnas.search import SearchConfig, search
    result = search(SearchConfig.create("pc-darts", dataset="cifar10", data="~/data/cifar-10"), out_dir="run")
    print(result.genotype)

``Searcher.resume(out_dir)`` continues an interrupted search exactly where its
last checkpoint left it.
"""

from fastnas.search.config import DATASETS, SPACES, SearchConfig
from fastnas.search.errors import CheckpointError, NonFiniteLossError, OutOfMemoryError, SearchError
from fastnas.search.methods import METHODS
from fastnas.search.searcher import Searcher, SearchResult, build_network, genotype_to_json, prune_candidates, search

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
    "build_network",
    "genotype_to_json",
    "prune_candidates",
    "search",
]
