"""Readable results: markdown tables with mean ± std, paired t-tests, plots."""
