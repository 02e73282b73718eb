"""Several nodes, simulated on this machine: two torchrun node agents (one process each) meet
through a c10d rendezvous on localhost, as two nodes of a cluster would. They share one run
folder (a cluster's shared filesystem), or each has its own (node-local disks)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, ROOT, max_diff, weights
from tools.gpu_check import children

pytestmark = pytest.mark.slow   # every test here starts torchrun agents

# A fresh store for every rendezvous round: with torchrun's default (the agent's store, shared
# by all rounds) a restarted group can read the dead group's keys, and the per-restart key prefix
# that avoids it on one node differs between nodes (pytorch#135712, #108158). The README's
# multi-node command sets the same.
ENV = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TINY = ["--task", "seg", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads", "2", "--workers", "0",
        "--seed", "2", "--val-size", "4", "--train-size", "32", "--batch-size", "8"]
RUN = [*TINY, "--epochs", "2", "--ckpt-every", "1"]          # 2 epochs of 4 steps, a checkpoint every step


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_core(i):
    """Each simulated node gets a core of its own, as a real node has its own CPUs (train.py sizes
    its thread pool to the cores it may use: two nodes sharing every core would oversubscribe)."""
    cores = sorted(os.sched_getaffinity(0))
    return lambda: os.sched_setaffinity(0, {cores[i % len(cores)]})


class Nodes:
    """Two torchrun node agents, one worker each; outs: each node's --out (one shared folder, or two)."""

    def __init__(self, tmp_path, outs, *args, max_restarts=0):
        port, self.logs = free_port(), [tmp_path / f"node{i}.log" for i in range(2)]
        self.agents = []
        for out, log in zip(outs, self.logs):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                   f"--rdzv-id={tmp_path.name}", "train.py", *args, "--out", str(out)]
            with open(log, "w") as f:
                self.agents.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                                    preexec_fn=one_core(len(self.agents))))

    def workers(self):
        """{global rank: pid} of the running workers (torchrun's children)."""
        found = {}
        for agent in self.agents:
            for pid in children(agent.pid):
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                    found[int(env[b"RANK"])] = pid
                except (OSError, KeyError, ValueError):
                    pass
        return found

    def wait(self, timeout):
        """Exit codes of both agents; a hang fails the test (and nothing is left running)."""
        deadline = time.time() + timeout
        try:
            for agent in self.agents:
                agent.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job still runs after {timeout} s (a hang):\n{self.output()[-3000:]}") from None
        finally:
            self.kill()
        return [a.returncode for a in self.agents]

    def kill(self):
        for agent in self.agents:
            if agent.poll() is None:
                for pid in children(agent.pid):   # torchrun's workers are in sessions of their own
                    os.kill(pid, signal.SIGKILL)
                agent.kill()
                agent.wait()

    def output(self):
        return "\n".join(log.read_text(errors="replace") for log in self.logs)


def one_process(out, *args):
    run = subprocess.run([sys.executable, "train.py", *args, "--out", str(out)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def wait_for(path, nodes, timeout=120):
    start = time.time()
    while not os.path.exists(path):
        assert all(a.poll() is None for a in nodes.agents), nodes.output()[-3000:]
        assert time.time() - start < timeout, nodes.output()[-3000:]
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run of RUN (the same global batch): the weights every test here must end with."""
    out = tmp_path_factory.mktemp("reference")
    one_process(out, *RUN)
    return weights(out)


def test_two_nodes_sharing_a_run_folder_equal_one_process(tmp_path, reference):
    shared = tmp_path / "run"
    nodes = Nodes(tmp_path, [shared, shared], *RUN)
    assert nodes.wait(timeout=300) == [0, 0], nodes.output()[-3000:]
    assert "2 process(es)" in nodes.output()
    ckpt = torch.load(shared / "ckpt_last.pt", weights_only=True)
    assert ckpt["step"] == 8
    assert max_diff(reference, ckpt["model"]) < 1e-5


def killed_node_recovers(tmp_path, reference, pause_rank0):
    shared = tmp_path / "run"
    nodes = Nodes(tmp_path, [shared, shared], *RUN, max_restarts=1)
    try:
        wait_for(shared / "ckpt_last.pt", nodes)
        workers = nodes.workers()
        assert sorted(workers) == [0, 1], workers
        if pause_rank0:
            # rank 0 busy, not in a collective, while rank 1's node dies: the way an NCCL rank
            # blocked in a collective looks to its agent (NCCL notices a dead peer only after minutes)
            os.kill(workers[0], signal.SIGSTOP)
        os.kill(workers[1], signal.SIGKILL)                         # a node's worker dies mid-epoch
        killed_at = torch.load(shared / "ckpt_last.pt", weights_only=True)["step"]
        if pause_rank0:
            time.sleep(3)   # long enough for rank 1's agent to restart and wait for a new rendezvous
            os.kill(workers[0], signal.SIGCONT)
        codes = nodes.wait(timeout=90)
    finally:
        nodes.kill()
    out = nodes.output()
    assert codes == [0, 0], out[-3000:]
    assert killed_at < 8
    assert "resuming" in out                                        # the new group picked up the checkpoint
    ckpt = torch.load(shared / "ckpt_last.pt", weights_only=True)
    assert ckpt["step"] == 8
    assert max_diff(reference, ckpt["model"]) < 1e-5


def test_killed_worker_on_one_node_recovers(tmp_path, reference):
    killed_node_recovers(tmp_path, reference, pause_rank0=False)


def test_killed_worker_recovers_while_the_other_node_is_busy(tmp_path, reference):
    # The healthy node's agent then restarts its worker as a membership change, which does not
    # count as a restart: TORCHELASTIC_RESTART_COUNT differs between the nodes (pytorch#108158).
    killed_node_recovers(tmp_path, reference, pause_rank0=True)


def test_node_local_run_folders_resume_or_stop_at_once(tmp_path):
    # One node's disk holds a finished 1-epoch run (4 steps); the other's is empty. Extending the
    # run to 2 epochs must either resume correctly or stop at once, saying why; never hang.
    a, b = tmp_path / "node0_disk", tmp_path / "node1_disk"
    one_process(a, *TINY, "--epochs", "1")
    b.mkdir()
    before = weights(a)
    start = time.time()
    nodes = Nodes(tmp_path, [a, b], *TINY, "--epochs", "2")
    codes = nodes.wait(timeout=120)
    out = nodes.output()
    if codes == [0, 0]:
        # it resumed: then exactly as a single process resumes the same folder (in the folder of
        # whichever node the rendezvous made rank 0)
        ref = tmp_path / "reference"
        one_process(ref, *TINY, "--epochs", "1")
        one_process(ref, *TINY, "--epochs", "2")
        assert "resuming" in out
        done = [d for d in (a, b) if (d / "ckpt_last.pt").exists()
                and torch.load(d / "ckpt_last.pt", weights_only=True)["step"] == 8]
        assert done, out[-3000:]
        assert max_diff(weights(ref), weights(done[0])) < 1e-5
    else:
        assert "visible to every node" in out, out[-3000:]
        assert time.time() - start < 60, f"took {time.time() - start:.0f} s to stop"
        assert max_diff(before, weights(a)) == 0          # the checkpoint there is untouched
