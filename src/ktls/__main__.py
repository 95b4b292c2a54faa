"""``python -m ktls``: the ``ktls`` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
