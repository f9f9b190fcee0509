"""Training and evaluation: one trainer, one metric module, one compare loop for every model."""
