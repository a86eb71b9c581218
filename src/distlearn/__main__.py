"""``python -m distlearn`` runs the CLI (and is what torchrun launches on every rank)."""

import sys

from distlearn.cli import main

sys.exit(main())
