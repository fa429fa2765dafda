"""fastnas.search."""
