"""A DARTS search model in the style of the original research code.

Written for the tests of ``fastnas.patch``: it mirrors the module layout and the
forward passes that DARTS, PC-DARTS and P-DARTS code and their forks use, so
that the patcher is tested against the structures it meets in the wild.
"""
