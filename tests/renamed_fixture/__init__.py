"""DARTS search code in the style of the many forks that rename things, written here for the tests.

The mixed ops keep their candidate list under ``ops``, ``layers`` or
``candidate_ops`` and sum it each their own way; the network can follow the pools
with a batch norm or not, and build its batch norms affine or not, tracking
running statistics or not.
"""
