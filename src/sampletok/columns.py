"""The names of a prepared dataset's columns, in one place: prepare writes them, the dataset reader, the batch
builder, the token exporters and the Scorer read them.

Every column has one row per kept source row, in source order:

=====================  =========================================================================
``_user_key``          int64 stable hash of the raw user id (the same in every preparation and request)
``_ts``                int64 event time
``_instance_id``       int64 hash of the instance id (or of user, item and time)
``_split``             int8 0 train, 1 valid, 2 test (:data:`SPLIT_NAMES`)
``label__<name>``      float32 task label
``resp__<name>``       float32 response of a past row: 0/1, normalized value or vocabulary code
``known__<name>``      int64 time a response became known (:data:`NEVER`: never)
``cat__<name>``        int32 vocabulary code (0 padding, last = OOV) or bucket
``multi__<name>``      int32 [N, max_len] codes, 0-padded
``num__<name>``        float32 normalized value
=====================  =========================================================================

Example:
    >>> cat_col("item_id"), known_col("like")
    ('cat__item_id', 'known__like')
"""

from __future__ import annotations

import numpy as np

USER_KEY = "_user_key"
TIMESTAMP = "_ts"
INSTANCE_ID = "_instance_id"
SPLIT = "_split"
SPLIT_NAMES = ("train", "valid", "test")
NEVER = np.iinfo(np.int64).max  # the known-at time of a response that never became known


def label_col(name: str) -> str:
    return f"label__{name}"


def resp_col(name: str) -> str:
    return f"resp__{name}"


def known_col(name: str) -> str:
    return f"known__{name}"


def cat_col(name: str) -> str:
    return f"cat__{name}"


def multi_col(name: str) -> str:
    return f"multi__{name}"


def num_col(name: str) -> str:
    return f"num__{name}"
