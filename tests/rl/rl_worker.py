"""One process of a test job: ``rl_worker.py ALGORITHM CONFIG_JSON [die]``.

Runs :func:`distlearn.rl.cli.run_algorithm` with the JSON config. With ``die``, rank 1 joins the job and then
exits at once (exit code 3), to check that its peers end on their own with an error.
"""

from __future__ import annotations

import json
import os
import sys

from distlearn.rl.cli import run_algorithm
from distlearn.rl.config import config_for

if __name__ == "__main__":
    name, values = sys.argv[1], json.loads(sys.argv[2])
    if len(sys.argv) > 3 and sys.argv[3] == "die" and os.environ.get("RANK") == "1":
        from distlearn.launch import init_distributed

        init_distributed(timeout_s=float(values.get("timeout", 10)))
        os._exit(3)
    summary = run_algorithm(name, config_for(name, values))
    print(json.dumps(summary))
