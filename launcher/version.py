"""The launcher's version: a leaf module, so that agents and ranks can read it without loading the head."""

__version__ = "0.1.0"
