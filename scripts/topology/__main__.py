"""``python -m scripts.topology``: the command line (``cli.main``)."""
import sys

from scripts.topology.cli import main

sys.exit(main())
