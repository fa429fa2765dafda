"""SPOS (Guo et al., 2020): one path drawn uniformly per step, optionally under a parameter or FLOPs
constraint; unsampled candidates get no update at all.

Checked against megvii-model/SinglePathOneShot (``src/Supernet/train.py``): one
uniformly drawn choice per layer and step; under a FLOPs constraint a bin of the
allowed range is drawn uniformly, then candidates until one falls in it (500
tries, else an unconstrained one); the gradients of blocks that did not run are
set to None before SGD's step, so they get neither momentum nor weight decay;
no weight decay on batch-norm parameters and biases. The paper's ImageNet run:
batch 1024, SGD 0.5 (momentum 0.9), weight decay 4e-5, 120 epochs (150,000
iterations), as here, and further:

* the learning rate decays linearly to 0: ``LambdaLR(lambda step: 1 - step /
  total_iters)``, stepped every iteration. Here ``lr_schedule = "linear"``
  steps it every epoch, ``lr * (1 - e / E)`` in epoch e of E (at most lr / E
  from the per-iteration value);
* label smoothing 0.1 on the supernet's training loss (``CrossEntropyLabelSmooth(1000,
  0.1)``, whose targets ``(1 - 0.1) * onehot + 0.1 / classes`` are
  ``F.cross_entropy``'s ``label_smoothing``); the validation loss stays plain;
* before an architecture is scored, batch-norm statistics recomputed on 20,000
  training images: ``fastnas select`` (``fastnas.tools.selection``, ``SPOS_BN_IMAGES``).
"""

from __future__ import annotations

from fastnas.search.methods.single_path import PathContext, SinglePathMethod


class SPOS(SinglePathMethod):
    name = "spos"
    summary = "SPOS: one uniformly sampled path per step (optionally under a --constraint), supernet for select"
    defaults = dict(
        epochs=120, batch_size=1024, lr=0.5, lr_min=0.0, weight_decay=4e-5, train_portion=0.8, label_smoothing=0.1
    )
    digits_epochs = 30
    supports_constraint = True
    lr_schedule = "linear"

    def configure(self, values: dict, given: dict) -> None:
        if values["dataset"] == "digits" and "lr" not in given:
            # The paper's 0.5 is for batches of 1024.
            values["lr"] = 0.1

    def passes(self, ctx: PathContext, batch_size: int):
        path = ctx.encoding.to_path(ctx.sampler.sample(ctx.rng))
        return [(slice(None), ctx.dropped(path), 1.0)]
