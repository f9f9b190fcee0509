"""sampletok: turn a user's whole past raw samples into tokens for ranking models."""

from sampletok.schema import Schema

__version__ = "0.1.0"
__all__ = ["Schema", "__version__"]
