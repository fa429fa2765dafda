"""Triton kernels of fastnas, installed as ``fastnas.kernels``.

Importing this package needs triton; fastnas imports it only when the triton
backend is used or probed.
"""
