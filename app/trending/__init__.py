"""Trending helpers without Ray: per-block event aggregation, caps, smoothing state and the
Redis lists the API reads. The statistical model lives in `training/trending.py`."""
