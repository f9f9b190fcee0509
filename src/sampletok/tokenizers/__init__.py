"""Tokenizers: what turns a raw sample into stored tokens (IAT source models, SIF HGAQ)."""
