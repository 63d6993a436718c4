"""``python -m minicpmv``: the same command line as ``minicpmv`` (see ``cli.py``)."""

from .cli import main

raise SystemExit(main())
