"""kd-cache core library: config, guards, storage math, data, teacher inference, the cache format, KD loss.

Nothing here imports Prefect, so every piece is usable and testable on its own.
"""

__version__ = "0.1.0"
