"""``python -m flwr_dsparse.deploy up|down|status|certs|keys``: the ``dsparse deploy`` command."""

import sys

from flwr_dsparse.cli.deploy import main

sys.exit(main())
