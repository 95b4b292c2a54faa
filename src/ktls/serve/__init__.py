"""``ktls serve``: an HTTPS file server whose file bodies go out by sendfile through the
kernel's TLS layer (the software engine where the kernel can't).

:mod:`.rules` decides what to answer (sans-IO), :mod:`.server` moves the bytes (h11 over
:mod:`ktls.asyncio`), :mod:`.main` is the command: certificate, workers, reports.
"""

from __future__ import annotations

from .server import FileServer, Limits, Stats

__all__ = ["FileServer", "Limits", "Stats"]
