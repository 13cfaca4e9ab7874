"""``python -m flwr_dsparse.collective …``: the ``dsparse collective`` command."""

import sys

from flwr_dsparse.cli.collective import main

sys.exit(main())
