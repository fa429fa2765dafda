"""The run layer that search and train both stand on.

``loop.Run`` (resume, seeding, wrapping for several processes, mixed precision,
finite checks, progress, the epoch log and checkpoints), ``checkpoint`` (the
checkpoint format and atomic writes), ``data`` (splits, samplers and loaders),
``distributed`` (process groups under torchrun) and ``scalars`` (TensorBoard).
Nothing here imports ``fastnas.search`` or ``fastnas.train``.
"""
