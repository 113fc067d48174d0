"""``mlx-stack mesh status --watch`` against a real broker: a bounded run draws every node,
a broker that stops answering is said on screen, and Ctrl-C ends the watch cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from testkit.harness import ROOT, Cluster, run_cli, wait_for


def test_watch_draws_the_mesh_and_says_when_the_broker_is_down(cluster: Cluster) -> None:
    cluster.worker("--engine", "synthetic", "--model", "syn", "--slots", "3")
    result = run_cli("mesh", "status", "--watch", "--count", "3", "--interval", "0.2",
                     env=cluster.env)
    assert result.returncode == 0, result.stderr
    assert "node-a" in result.stdout and "coordinator" in result.stdout
    assert "syn (0/3, queue 0)" in result.stdout and "tokens/s" in result.stdout

    cluster.procs[0].kill(signal.SIGKILL)  # the broker
    result = run_cli("mesh", "status", "--watch", "--count", "2", "--interval", "0.2",
                     env=cluster.env)
    assert result.returncode == 0, result.stderr
    assert "no broker answered" in result.stdout
    assert "Traceback" not in result.stderr


def test_ctrl_c_ends_the_watch_cleanly(cluster: Cluster) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mlx_stack.cli", "mesh", "status", "--watch"],
                            cwd=ROOT, env={**os.environ, **cluster.env, "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def asking() -> bool:  # it has reached the broker: the watch is running
            connections = psutil.Process(proc.pid).net_connections()
            return any(c.raddr and c.raddr.port == cluster.broker_port for c in connections)

        wait_for("the watch to ask the broker", asking, timeout=30)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "no broker answered" not in stderr
