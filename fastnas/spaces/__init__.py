"""fastnas.spaces."""
