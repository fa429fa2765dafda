"""The ShuffleNet space of SPOS behind one ``SearchSpace``."""

from __future__ import annotations

from fastnas.spaces.shufflenet.eval_network import ShuffleNetNetwork
from fastnas.spaces.shufflenet.genotype import NUM_LAYERS, check_blocks
from fastnas.spaces.shufflenet.supernet import ShuffleNetSearchNetwork
from fastnas.spaces.space import SearchSpace

# --- the space, for the searchers, fastnas select and fastnas train ------------------------

_NB201_CIFAR = dict(
    auxiliary=False, drop_path_prob=0.0, epochs=200, batch_size=256, lr=0.1, lr_schedule="cosine", lr_min=0.0,
    nesterov=True, weight_decay=5e-4, grad_clip=None, crop_padding=4, flip=True, cutout=0,
)  # fmt: skip

TRAIN_DEFAULTS = {
    # SPOS (megvii-model/SinglePathOneShot src/Evaluation): C=16, batch 1024, SGD 0.5 (momentum 0.9)
    # decayed linearly to 0 over 300,000 iterations (240 epochs), weight decay 4e-5, label smoothing
    # 0.1; random resized crops, colour jitter, flips.
    "imagenet": dict(
        init_channels=16, layers=NUM_LAYERS, auxiliary=False, drop_path_prob=0.0, label_smoothing=0.1,
        epochs=240, batch_size=1024, lr=0.5, lr_schedule="linear", weight_decay=4e-5, grad_clip=None,
        image_size=224, crop_padding=0, flip=True, cutout=0, imagenet_augment=True,
    ),
    # No SPOS recipe for small images: NAS-Bench-201's, whose schedule suits 32x32 images.
    "cifar10": dict(_NB201_CIFAR, init_channels=16, layers=NUM_LAYERS),
    "cifar100": dict(_NB201_CIFAR, init_channels=16, layers=NUM_LAYERS),
    "digits": dict(
        _NB201_CIFAR, init_channels=4, layers=NUM_LAYERS, epochs=30, batch_size=96, image_size=8, crop_padding=1,
        flip=False,
    ),
}  # fmt: skip


def _stem_stride(dataset: str) -> int:
    return 2 if dataset == "imagenet" else 1


class ShuffleNetSpace(SearchSpace):
    """SPOS' layer-wise space: 20 layers of 4 ShuffleNetV2-style candidates; single-path methods only."""

    name = "shufflenet"
    title = "ShuffleNet (SPOS)"
    architecture_noun = "a ShuffleNet architecture"
    train_defaults = TRAIN_DEFAULTS

    def search_layers(self, dataset: str) -> int:
        return NUM_LAYERS

    def validate_search(self, config) -> None:
        from fastnas.errors import SearchError

        super().validate_search(config)
        if config.layers != NUM_LAYERS:
            raise SearchError(f"the ShuffleNet space has {NUM_LAYERS} layers; drop --layers {config.layers}")

    def build_supernet(self, config, num_classes, in_channels, layers, edge_primitives=None):
        if layers != NUM_LAYERS:
            raise ValueError(f"the ShuffleNet space has {NUM_LAYERS} layers; drop --layers {layers}")
        return ShuffleNetSearchNetwork(
            C=config.init_channels, num_classes=num_classes, in_channels=in_channels,
            stem_stride=_stem_stride(config.dataset), affine=config.bn_affine,
        )  # fmt: skip

    def genotype(self, net, config):
        raise ValueError("the ShuffleNet supernet has no architecture weights; fastnas select picks its architecture")

    def to_json(self, genotype) -> dict:
        return {"blocks": list(genotype)}

    def recognises(self, data: dict) -> bool:
        return "blocks" in data

    def from_json(self, data: dict) -> list[str]:
        return check_blocks(data.get("blocks"))

    def describe(self, genotype) -> str:
        return " ".join(genotype)

    def plot(self, genotype, path) -> None:
        raise NotImplementedError("a ShuffleNet architecture is a list of blocks; it has no cell to draw")

    def build_eval_network(self, genotype, config, num_classes, in_channels):
        return ShuffleNetNetwork(genotype, config.init_channels, num_classes, in_channels, _stem_stride(config.dataset))

    def check_train_config(self, config) -> str | None:
        if config.auxiliary:
            return "the ShuffleNet network has no auxiliary head; drop --auxiliary"
        if config.layers != NUM_LAYERS:
            return f"a ShuffleNet architecture has {NUM_LAYERS} layers; drop --layers {config.layers}"
        return None
