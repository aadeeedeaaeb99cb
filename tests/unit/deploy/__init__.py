"""Unit tests of deploy/: the example models it writes. May import deploy and meshnode."""
