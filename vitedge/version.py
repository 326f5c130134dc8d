"""The vitedge version, recorded in every artifact (its own module so that stages can read it)."""

__version__ = "0.1.0"
