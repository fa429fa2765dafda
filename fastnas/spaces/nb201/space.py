"""The NAS-Bench-201 cell space behind one ``SearchSpace``."""

from __future__ import annotations

from fastnas.errors import SearchError
from fastnas.spaces.nb201.eval_network import TRAIN_DEFAULTS, NB201Network, check_eval_arch
from fastnas.spaces.nb201.genotype import NB201_PRIMITIVES, NB201Arch, plot_nb201
from fastnas.spaces.nb201.heuristics import OFA_PAIR, SUPERNET_OPTIONS
from fastnas.spaces.nb201.supernet import NB201SearchNetwork
from fastnas.spaces.space import SearchSpace


class NB201Space(SearchSpace):
    """The NAS-Bench-201 cell space: 4 nodes, 6 edges of 5 operations, one cell for the whole network."""

    name = "nb201"
    title = "NAS-Bench-201"
    architecture_noun = "a NAS-Bench-201 architecture"
    supernet_options = SUPERNET_OPTIONS

    @property
    def train_defaults(self) -> dict[str, dict]:
        return TRAIN_DEFAULTS

    def validate_search(self, config) -> None:

        super().validate_search(config)
        for name in ("global_dropout", "layer_path_dropout"):
            if not 0.0 <= getattr(config, name) < 1.0:
                raise SearchError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(config, name)}")
        used = [name for name in self.supernet_options if getattr(config, name)]
        if used and config.search_method.trains_architecture:
            options = ", ".join("--" + name.replace("_", "-") for name in used)
            raise SearchError(
                f"{options}: settings of single-path supernet training (spos, fairnas, oneshot), not {config.method}"
            )
        primitives = config.primitives or NB201_PRIMITIVES
        if config.ofa_kernel and not set(OFA_PAIR) <= set(primitives):
            raise SearchError(f"--ofa-kernel shares the kernels of {' and '.join(OFA_PAIR)}; the candidates lack one")

    def search_layers(self, dataset: str) -> int:
        # NAS-Bench-201 counts cells per stage (N = 5), not cells in all.
        return 1 if dataset == "digits" else 5

    def build_supernet(self, config, num_classes, in_channels, layers, edge_primitives=None) -> NB201SearchNetwork:
        kwargs = {} if config.primitives is None else {"primitives": list(config.primitives)}
        heuristics = {name: getattr(config, name) for name in self.supernet_options}
        return NB201SearchNetwork(
            C=config.init_channels, N=layers, num_classes=num_classes, backend=config.backend,
            in_channels=in_channels, affine=config.bn_affine, **heuristics, **kwargs,
        )  # fmt: skip

    def to_json(self, genotype) -> dict:
        return {"arch": genotype.to_string()}

    def recognises(self, data: dict) -> bool:
        return "arch" in data or "nodes" in data

    def from_json(self, data: dict) -> NB201Arch:
        if "arch" in data and not isinstance(data["arch"], str):
            raise ValueError(f"'arch' must be a NAS-Bench-201 string, got {type(data['arch']).__name__}")
        try:
            arch = NB201Arch.from_dict(data)
        except (TypeError, IndexError) as exc:
            raise ValueError(f"malformed NAS-Bench-201 architecture: {exc}") from None
        check_eval_arch(arch)
        return arch

    def describe(self, genotype) -> str:
        return genotype.to_string()

    def plot(self, genotype, path) -> None:
        plot_nb201(genotype, path)

    def build_eval_network(self, genotype, config, num_classes, in_channels):
        return NB201Network(genotype, config.init_channels, config.layers, num_classes, in_channels)

    def check_train_config(self, config) -> str | None:
        if config.auxiliary:
            return "the NAS-Bench-201 network has no auxiliary head; drop --auxiliary"
        return None
