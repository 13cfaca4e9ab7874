"""The ``dsparse`` command line: one module per command family.

* :mod:`.main`: the entry point, ``plan`` and ``profile``;
* :mod:`.deploy`: ``dsparse deploy up|down|status|certs|keys``;
* :mod:`.collective`: ``dsparse collective`` (one rank, or ``--local`` ranks);
* ``pretrain`` comes from :mod:`flwr_dsparse.weights`;
* ``compare`` runs the repository's ``experiments.compare`` (not part of the installed library).
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
