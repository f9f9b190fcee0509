"""Raw-sample readers: files (CSV/Parquet), MovieLens layouts, and the synthetic generator."""

from sampletok.data.sources.files import FileSource, FrameSource, RawChunk, RawSource

__all__ = ["FileSource", "FrameSource", "RawChunk", "RawSource"]
