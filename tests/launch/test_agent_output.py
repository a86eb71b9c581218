"""The torchrun agent's standard error relayed without its own noise, and the first failure in one line.

Checked on the agent's real output: the fixture text is what a 2-worker `distlearn train --lr 1e6` job
printed (torch 2.13), with a worker's own Python traceback added, which must come through whole.
"""

from __future__ import annotations

import io
import sys

import pytest

from distlearn.agent_output import AgentOutput
from distlearn.launch import launch_local

WORKER_ERROR = "distlearn train: error: rank 1: training diverged at step 3: the training loss is nan\n"
AGENT = """\
W1207 14:05:57.811000 7039 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 7053 closing
E1207 14:05:57.929000 7039 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2)
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/x/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:{space}
============================================================
distlearn FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-07_14:05:57
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 7053)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_14:05:57
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 2 (pid: 7054){space}
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
""".format(space=" ")  # torchrun leaves a space at the end of two lines
BUG = """\
Traceback (most recent call last):
  File "worker.py", line 3, in <module>
    1 / 0
ZeroDivisionError: division by zero
"""


def relay(text: str) -> tuple[str, AgentOutput]:
    out = io.StringIO()
    output = AgentOutput(io.BytesIO(text.encode()), out)
    output.join()
    return out.getvalue(), output


def test_the_agents_noise_is_dropped_and_the_root_cause_read():
    shown, output = relay(WORKER_ERROR + BUG + AGENT)
    assert shown == WORKER_ERROR + BUG  # the worker's message and its own traceback, whole; nothing else
    assert output.root_cause == (1, 2)
    assert output.failure() == "the job failed: rank 1 stopped with the error above (exit status 2)"


def test_a_killed_worker_is_named_with_its_signal():
    killed = AGENT.replace("exitcode  : 2 (pid: 7054)", "exitcode  : -9 (pid: 7054)")
    _, output = relay(killed)
    assert output.failure() == "the job failed: rank 1 was killed by SIGKILL"


def test_a_stream_with_no_failure_is_relayed_unchanged():
    text = "distlearn train: starting 2 worker(s)\nsome warning\n" + BUG
    shown, output = relay(text)
    assert shown == text and output.root_cause is None and output.failure() is None


@pytest.mark.timeout(180)
def test_a_worker_that_stops_with_a_distlearn_error_makes_the_job_exit_2_in_one_line(tmp_path, capfd):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys\n"
        "if os.environ['RANK'] == '1':\n"
        "    print('distlearn train: error: rank 1: something the user can fix', file=sys.stderr)\n"
        "    sys.exit(2)\n"
    )
    code = launch_local([str(worker)], 2, module=False, timeout_s=120)
    err = capfd.readouterr().err
    assert code == 2
    assert "rank 1: something the user can fix" in err
    assert "distlearn: error: the job failed: rank 1 stopped with the error above (exit status 2)" in err
    assert "Traceback" not in err and "ChildFailedError" not in err, err


def test_the_real_agent_prints_what_the_relay_expects():
    """The summary block's field names, as this torch's torchrun writes them (so the parsing stays true)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    assert sys.version_info >= (3, 10)
    failure = ProcessFailure(local_rank=1, pid=7054, exitcode=2, error_file="/nonexistent")
    failure.global_rank = 1  # set by the agent
    text = ChildFailedError("distlearn", {1: failure}).format_msg()
    assert "Root Cause" in text and "rank      : 1" in text and "exitcode  : 2" in text
