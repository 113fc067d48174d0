"""What the job table says of a job to the others: where its worker sends its output, and
what its gateway hears when the worker was lost after its output began."""

from __future__ import annotations

from mlx_stack.common import messages as msgs
from mlx_stack.common.config import is_loopback


def reply_to(submit: msgs.Submit, worker_node: str) -> str:
    """The gateway's stream endpoint for a worker on ``worker_node``, if it can reach it:
    a loopback endpoint only from the gateway's own node (elsewhere it would name the
    worker's own machine)."""
    host = submit.reply_to.removeprefix("tcp://").rpartition(":")[0]
    if not host or (is_loopback(host) and worker_node != submit.node_id):
        return ""
    return submit.reply_to


def lost(job_id: str, reason: str) -> msgs.Fail:
    """What a gateway hears of a job whose worker was lost after its output began: resume
    it (``job_id``: the job's, or a dispatch's for a job already released)."""
    return msgs.Fail(job_id=job_id, code=msgs.ErrorCode.WORKER_LOST, retryable=True,
                     error=f"{reason}; resubmit with what the client has seen as resume tokens")
