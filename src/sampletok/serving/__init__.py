"""Online serving: raw requests and events in, scores out, over the same token stores the offline path writes.

* :mod:`~sampletok.serving.events`: the event store (every raw sample's encoded features, responses and
  their availability, per user, time-ordered) that online batches are built from, and its bulk load from a
  prepared dataset;
* :mod:`~sampletok.serving.scorer`: :class:`~sampletok.serving.scorer.Scorer` encodes a request's rows with
  the fitted encoder, fetches the user's history once, builds the :class:`~sampletok.features.Batch` the model
  was trained on and scores every candidate; it appends new events (and their IAT tokens or SIF codes);
* :mod:`~sampletok.serving.app`: the FastAPI service (``sampletok serve``; the ``serve`` extra).
"""
