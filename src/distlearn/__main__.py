"""``python -m distlearn`` runs the CLI (and is what torchrun launches on every rank)."""

import sys

from distlearn.lifeline import tie_to_agent

tie_to_agent()  # first of all: a worker of torchrun's agent dies with the agent, whatever kills it

from distlearn.cli import main  # noqa: E402 -- after the tie, so a slow import is covered too

sys.exit(main())
