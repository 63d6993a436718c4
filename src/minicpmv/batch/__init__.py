"""Batch inference over large collections (``minicpmv batch``) and multi-replica serving on Ray.

- ``inputs``: rows from a folder, a glob or a JSONL/CSV/Parquet table; ``output``: JSONL or
  Parquet results written in atomic chunks, resumable; ``prepare``: media decoding and the
  processor, on a CPU; ``engine_adapter``: the only contact with the generation engine;
  ``job``: the job's settings and chunked writing; ``runner``: ``run_batch``, the job from end
  to end.
- Runners: ``local`` (one process, the continuous-batching engine) and ``ray_data`` (Ray Data:
  CPU workers for preprocessing, an actor pool of model replicas).
- ``ray_serve``: ``minicpmv serve --ray``, the OpenAI-compatible app as a Ray Serve deployment.

Ray is the optional ``[scale]`` extra and is imported only through ``ray_setup``. Importing
this package imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .job import BatchJob, RayOptions, Summary
    from .runner import run_batch

__all__ = ["BatchJob", "RayOptions", "Summary", "run_batch"]


def __getattr__(name: str) -> Any:
    if name == "run_batch":
        from .runner import run_batch

        return run_batch
    if name in __all__:
        from . import job

        return getattr(job, name)
    raise AttributeError(f"module 'minicpmv.batch' has no attribute {name!r}")
