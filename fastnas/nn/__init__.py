"""fastnas.nn."""
