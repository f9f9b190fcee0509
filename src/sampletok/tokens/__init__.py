"""The tokens layer, above the models: building, exporting, appending, opening and checking the token stores
that models read (IAT's instance embeddings, SIF's sample codes), one :class:`TokenMethod` per kind of token
input a model declares. :mod:`sampletok.tokenizers` keeps only the networks a model embeds."""

from sampletok.tokens import iat, sif  # noqa: F401  (registration)
from sampletok.tokens.base import METHODS, EventTokenizer, TokenMethod, open_tokens, token_method

__all__ = ["METHODS", "EventTokenizer", "TokenMethod", "open_tokens", "token_method"]
