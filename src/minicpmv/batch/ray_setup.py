"""Importing and connecting to Ray (the optional ``[scale]`` extra) for batch jobs and serving.

``import_ray()`` is the only way the package imports Ray: without it, a one-line
``FeatureNotAvailableError`` tells the user what to install. ``connect(address, ...)`` uses the
Ray instance this process already joined, else joins the cluster at ``address`` (``"auto"``: the
one ``ray start`` runs on this machine), else starts a private local instance (no dashboard;
``num_cpus`` / ``object_store_mb`` as given). It returns True when it started Ray itself, so the
caller shuts down only what it started. The process keeps its own SIGTERM handling (``ray.init``
installs a handler that aborts the process, which would skip the caller's clean-up). Nothing
here loads a model.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from ..errors import FeatureNotAvailableError

log = logging.getLogger(__name__)

INSTALL_HINT = 'Ray is not installed: pip install "minicpmv[scale]"'


def import_ray() -> Any:
    """The ``ray`` module, or FeatureNotAvailableError with the install command."""
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] part of the extra
    except ImportError as e:
        raise FeatureNotAvailableError(f"{INSTALL_HINT} ({e})") from e
    return ray


def import_serve() -> Any:
    """``ray.serve``, or FeatureNotAvailableError with the install command."""
    import_ray()
    try:
        from ray import serve
    except ImportError as e:
        raise FeatureNotAvailableError(f"{INSTALL_HINT} ({e})") from e
    return serve


def connect(address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int | None = None) -> bool:
    """Join Ray (see the module docstring); True when this call started a local instance."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        kwargs["address"] = address
    else:
        log.info("starting a local Ray instance")
        kwargs["include_dashboard"] = False
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if object_store_mb is not None:
            kwargs["object_store_memory"] = int(object_store_mb) * 2**20
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(**kwargs)
    if main and previous is not None:
        signal.signal(signal.SIGTERM, previous)  # ray.init installs a SIGTERM handler that aborts
    return not address
