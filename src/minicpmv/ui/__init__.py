"""Local web UI (``minicpmv ui``): chat with images and video in the browser, built on Gradio.

``launch(model, port=...)`` loads the checkpoint once and serves the page; ``build_app(shared)``
returns the page without serving it. Gradio is an optional dependency (the ``[ui]`` extra) and
is imported only when one of these is called; importing this package loads no model.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app", "launch"]


def launch(model: Any, **kwargs: Any) -> None:
    """See ``minicpmv.ui.app.launch``."""
    from .app import launch as _launch

    _launch(model, **kwargs)


def build_app(shared: Any, **kwargs: Any) -> Any:
    """See ``minicpmv.ui.app.build_app``."""
    from .app import build_app as _build_app

    return _build_app(shared, **kwargs)
