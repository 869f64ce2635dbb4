"""A real two-node Ray cluster on this machine: `ray start --head` and `ray start --address …`, each
node with its own custom resource, both started from a folder other than the repository. The
rollout engine is pinned to one node and the learner rank to the other through their placement
bundles (rollout.resources, learner.resources); two RL steps run with the weight sync across the
nodes, and afterwards the engine's log-probs of a fixed response equal the learner's. The config
names its model and DeepSpeed config by relative paths, which the driver resolves for every node.

The driver runs in a fresh process: Ray keeps a process's token-authentication state across
`ray.shutdown()`, so a test process that earlier ran a local (token) cluster rejects, unauthenticated,
the calls this cluster's GCS makes to the driver as the owner of its actors — and the GCS, taking the
owner for dead, cancels them before they start (what failed in CI)."""

import concurrent.futures
import glob
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
import ray
import torch

from engine.config import load_config
from engine.learner import Sequence
from engine.trainer import Trainer

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
RESPONSE = "<think>Brown.</think><answer>A</answer>"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log, process, text="Ray runtime started"):
    for _ in range(120):
        if text in log.read_text():
            return
        assert process.poll() is None, log.read_text()
        time.sleep(1)
    raise AssertionError(f"no {text!r} in {log}:\n{log.read_text()}")


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """Address of a running two-node cluster: the head offers {rollout_node: 1}, the other node
    {learner_node: 1}; one CPU each. Without token authentication (Ray 2.60 turns it on for new
    clusters, and a driver connecting by address sends a token only when RAY_AUTH_MODE=token was set
    before ray was imported): the environment says so for the nodes and for the driver process."""
    # Ray refuses a second node on the loopback address unless told this is a (test) cluster.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    logs = [tmp_path / "head.log", tmp_path / "node.log"]
    nodes = [subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                               '--resources={"rollout_node": 1}', *common], cwd=tmp_path,
                              stdout=open(logs[0], "w"), stderr=subprocess.STDOUT)]
    try:
        _wait_for(logs[0], nodes[0])
        nodes.append(subprocess.Popen([RAY, "start", f"--address={address}", '--resources={"learner_node": 1}',
                                       *common], cwd=tmp_path, stdout=open(logs[1], "w"), stderr=subprocess.STDOUT))
        _wait_for(logs[1], nodes[1])
        yield address
    finally:
        for node in reversed(nodes):  # `ray start --block` stops exactly its own processes on SIGTERM
            node.terminate()
            node.wait(timeout=60)


def _ray_logs(since: float) -> str:
    """The tails of the Ray logs of sessions started since `since` (for a failure message)."""
    paths = [p for pattern in ("gcs_server.out", "raylet*.out", "raylet*.err", "python-core-driver-*.log")
             for p in glob.glob(f"/tmp/ray/session_*/logs/{pattern}")
             if os.path.getmtime(os.path.dirname(os.path.dirname(p))) >= since]
    return "\n".join(f"--- {p}\n" + "".join(open(p, errors="replace").readlines()[-40:]) for p in sorted(paths))


def test_rollout_and_learner_on_two_nodes(cluster, tiny_model, demo_data, tmp_path):
    started = time.time() - 120
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        try:
            ex.submit(_train_on_two_nodes, cluster, tiny_model, demo_data, str(tmp_path)).result()
        except Exception as e:
            raise AssertionError(f"{type(e).__name__}: {e}\n\nRay logs:\n{_ray_logs(started)}") from e
    rows = [line for line in open(tmp_path / "two_nodes" / "metrics.jsonl")]
    assert len(rows) == 2 and os.path.isfile(tmp_path / "two_nodes" / "hf" / "model.safetensors")


def _node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def _train_on_two_nodes(address, tiny_model, demo_data, tmp_path):
    """The driver, in its own process."""
    ray.init(address=address, namespace="pathorl-test-multinode")
    try:
        for _ in range(120):
            if sum(n["Alive"] for n in ray.nodes()) == 2:
                break
            time.sleep(1)
        # A node counts as alive before it can start worker processes: run a task on each first.
        probe = ray.remote(lambda: ray.get_runtime_context().get_node_id())
        ray.get([probe.options(num_cpus=0, resources={r: 0.01}).remote() for r in ("rollout_node", "learner_node")],
                timeout=300)
        _two_steps(tiny_model, demo_data, tmp_path)
    finally:
        ray.shutdown()


def _two_steps(tiny_model, demo_data, tmp_path):
    nodes = {next(k for k in n["Resources"] if k.endswith("_node")): n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(nodes) == {"rollout_node", "learner_node"} and len(set(nodes.values())) == 2
    cfg = load_config("launch/configs/demo.yaml", [
        f"model.path={os.path.relpath(tiny_model)}", f"data.train={demo_data}/train.jsonl", "data.val=null",
        f"trainer.output_dir={tmp_path}", "trainer.run_name=two_nodes", "trainer.steps=2", "trainer.eval_every=0",
        "sft.steps=0", "rollout.prompts_per_step=2", "rollout.group_size=3", "rollout.max_new_tokens=8",
        "rollout.cpu_threads=1", "learner.torch_threads=1", "learner.lr=1e-2", "algorithm.entropy_coef=0.1",
        "trainer.loggers=[jsonl]", "rollout.resources={rollout_node: 0.5}", "learner.resources={learner_node: 0.5}"])
    assert not os.path.isabs(cfg.model.path) and not os.path.isabs(cfg.learner.deepspeed_config)
    trainer = Trainer(cfg)
    try:
        worker, rank = trainer.pool.workers[0], trainer.learners.ranks[0]
        assert _node_of(worker) == nodes["rollout_node"] and _node_of(rank) == nodes["learner_node"]
        prompt = trainer.stream.take(1)[0]
        response_ids = trainer.tokenizer(RESPONSE)["input_ids"] + [trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        _, before = ray.get(worker.prompt_logprobs.remote(prompt.text + RESPONSE + "<|im_end|>", prompt.images))
        trainer.fit()
        ids, engine = ray.get(worker.prompt_logprobs.remote(prompt.text + RESPONSE + "<|im_end|>", prompt.images))
        moved = torch.tensor(engine[len(prompt.prompt_ids):]) - torch.tensor(before[len(prompt.prompt_ids):])
        assert moved.abs().max() > 1e-3, "the engine on the rollout node still runs the initial weights"
        learner = trainer.learners.compute_logprobs(
            [Sequence(prompt_ids=prompt.prompt_ids, response_ids=response_ids, image=0)],
            [(prompt.pixel_values, prompt.image_grid_thw)], "old")[0]
        assert ids == prompt.prompt_ids + response_ids
        assert (torch.tensor(engine[len(prompt.prompt_ids):]) - torch.tensor(learner)).abs().max() < 1e-4
    finally:
        trainer.close()
