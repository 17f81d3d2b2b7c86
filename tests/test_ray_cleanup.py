"""The Ray-on-Spark cleanup kills the agents its own cluster left behind after shutdown, and no
other cluster's: not one whose temp folder merely starts with the same path, nor an agent that
only shares the name. Stand-in processes play the nodes and agents (no Ray is started)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from lakevision.processes import start_ticks
from lakevision.training.ray_cluster import cluster_processes, kill_leftover_agents, remove_cluster

from . import processes

# a node: starts one agent (its argv from the command line's JSON) and writes the agent's pid
NODE = """
import json, subprocess, sys, time
agent = subprocess.Popen(json.loads(sys.argv[2]))
open(sys.argv[3], "w").write(str(agent.pid))
time.sleep(120)
"""
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


def _node(temp_dir: Path, agent_argv: list[str], pidfile: Path) -> subprocess.Popen:
    import json

    proc = subprocess.Popen([sys.executable, "-c", NODE, f"--temp-dir={temp_dir}", json.dumps(agent_argv),
                             str(pidfile)], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the stand-in node did not start its agent"
        time.sleep(0.05)
    return proc


def test_only_this_clusters_leftover_agents_are_killed(child_tmp):
    mine, other = child_tmp / "ray-6379-ab12cd34", child_tmp / "ray-6379-ab12cd34x"  # the other's path extends mine
    started: list[int] = []
    try:
        # this cluster's node, whose agent shows only its title (as a retitled Ray agent does)
        node = _node(mine, ["bash", "-c", "exec -a ray::DashboardAgent sleep 120"], child_tmp / "mine.pid")
        agent = int((child_tmp / "mine.pid").read_text())
        # another cluster's node and agent, on a temp folder that starts with this one's path
        other_node = _node(other, [*SLEEP, "dashboard/agent.py", f"--temp-dir={other}"], child_tmp / "other.pid")
        other_agent = int((child_tmp / "other.pid").read_text())
        # and an agent of some cluster this process knows nothing of
        stranger = subprocess.Popen(["bash", "-c", "exec -a ray::RuntimeEnvAgent sleep 120"], start_new_session=True)
        started += [node.pid, agent, other_node.pid, other_agent, stranger.pid]

        before = cluster_processes(str(mine))
        assert {node.pid, agent} <= set(before) and not {other_node.pid, other_agent, stranger.pid} & set(before)
        # the shutdown ends the node and leaves its agent orphaned, out of reach below the node
        node.send_signal(signal.SIGKILL)
        node.wait()
        assert processes.alive(agent) and agent not in cluster_processes(str(mine))

        assert kill_leftover_agents({**cluster_processes(str(mine)), **before}) == {agent}
        deadline = time.monotonic() + 10
        while processes.alive(agent) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not processes.alive(agent)
        assert all(processes.alive(p) for p in (other_node.pid, other_agent, stranger.pid))
    finally:
        for pid in started:
            processes.kill_group(pid, grace_s=0)
        for proc in (locals().get("node"), locals().get("other_node"), locals().get("stranger")):
            if proc is not None:
                proc.wait()


def test_a_reused_pid_is_not_taken_for_an_agent():
    """An agent that ended, whose pid now names another process (started later), is left alone."""
    with processes.owned(["bash", "-c", "exec -a ray::DashboardAgent sleep 120"]) as proc:
        deadline = time.monotonic() + 10
        while "ray::DashboardAgent" not in processes.command_line(proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ticks = start_ticks(proc.pid)
        assert kill_leftover_agents({proc.pid: ticks - 1}) == set() and processes.alive(proc.pid)
        assert kill_leftover_agents({proc.pid: ticks}) == {proc.pid}


# a node still shutting down: it names the folder, and writes its last log there after `delay` s
LATE_WRITER = """
import os, sys, time
time.sleep(float(sys.argv[2]))
logs = os.path.join(sys.argv[1].split("=", 1)[1], "session_latest", "logs")
os.makedirs(logs, exist_ok=True)
open(os.path.join(logs, "raylet.out"), "w").write("shutting down")
time.sleep(float(sys.argv[3]))
"""


def _late_writer(folder: Path, delay: float, linger: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LATE_WRITER, f"--temp-dir={folder}", str(delay), str(linger)],
                            start_new_session=True)
    deadline = time.monotonic() + 10
    while str(folder) not in processes.command_line(proc.pid):
        assert time.monotonic() < deadline, "the stand-in node did not start"
        time.sleep(0.02)
    return proc


def test_the_cluster_folder_is_removed_after_its_last_process_wrote_into_it(child_tmp):
    """A node that writes into the cluster's folder a second after the shutdown (CI once found
    ray-<port>-<id> back after it was removed): the folder goes once the node has ended."""
    folder = child_tmp / "ray-9890-1c984d43"
    (folder / "session_latest" / "logs").mkdir(parents=True)
    proc = _late_writer(folder, delay=1.0, linger=0.0)
    try:
        assert remove_cluster(str(folder), cluster_processes(str(folder)), grace_s=20) == set()
        proc.wait(timeout=10)
        assert not folder.exists() and not Path(f"{folder}.lock").exists()
    finally:
        processes.kill_group(proc.pid, grace_s=0)
        proc.wait()


def test_a_process_that_outlives_the_grace_is_killed_before_the_folder_goes(child_tmp):
    folder = child_tmp / "ray-9891-2d095e54"
    folder.mkdir()
    Path(f"{folder}.lock").write_text("")
    proc = _late_writer(folder, delay=3.0, linger=120.0)  # would write after the grace, then stay
    try:
        started = time.monotonic()
        assert remove_cluster(str(folder), cluster_processes(str(folder)), grace_s=1.0) == {proc.pid}
        assert time.monotonic() - started < 2.5
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert not folder.exists() and not Path(f"{folder}.lock").exists()
    finally:
        processes.kill_group(proc.pid, grace_s=0)
        proc.wait()
