"""Search spaces: the DARTS cell space and the NAS-Bench-201 cell space."""
