"""tiers: the infrastructure of a large-scale web service, runnable on one machine."""

__version__ = "0.1.0"
