"""What a benchmark leaves behind: its results as one JSON file, and a line saying where."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_json"]


def write_json(path: str | Path, document: Any) -> Path:
    """Write ``document`` to ``path`` as indented JSON (making its folder) and print where.

    Parameters
    ----------
    path : str or Path
        The file; missing parent folders are created.
    document : Any
        Anything :func:`json.dumps` takes.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    print(f"wrote {path}")
    return path
