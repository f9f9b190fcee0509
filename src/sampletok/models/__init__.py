"""One readable file per model, all over :mod:`sampletok.nn`; ``build_model(name, layout, **params)``."""

from sampletok.models import bst, dcnv2, din, dnn, hstu, iat, onetrans, rankmixer, sif  # noqa: F401  (registration)
from sampletok.models.base import MODELS, ModelOutput, RankingModel, build_model, register

__all__ = ["MODELS", "ModelOutput", "RankingModel", "build_model", "register"]
