"""The bucketed broadcast weight sync (the GPU path's code) between real processes over gloo:
every receiver gets every tensor bit-exactly, in buckets that respect the size limit and dtypes."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from rollout.weight_sync import join_group, plan_buckets, receive, send


def _weights():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(1000, 64, generator=g),          # 256 KB: a bucket of its own
        "model.layers.0.q_proj.weight": torch.randn(64, 64, generator=g),
        "model.layers.0.q_proj.bias": torch.randn(64, generator=g),
        "model.norm.weight": torch.randn(64, generator=g).to(torch.bfloat16),    # dtype change: new bucket
        "visual.proj": torch.randn(3, 5, 7, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(100, 64, generator=g),
    }


def _specs(weights):
    return [(k, tuple(v.shape), v.dtype) for k, v in weights.items()]


def _run(rank, world, port, queue):
    group = join_group("127.0.0.1", port, rank, world, "gloo", timeout_s=60)
    weights = _weights()
    plan = plan_buckets(_specs(weights), bucket_mb=0.1)
    if rank == 0:
        queue.put((rank, send(group, weights, plan, "cpu")))
    else:
        got = {name: t.clone() for name, t in receive(group, plan, "cpu")}
        queue.put((rank, all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in weights.items())
                   and list(got) == list(weights)))


def test_plan_buckets():
    plan = plan_buckets(_specs(_weights()), bucket_mb=0.1)
    assert [[e.name for e in b.entries] for b in plan] == [
        ["model.embed_tokens.weight"], ["model.layers.0.q_proj.weight", "model.layers.0.q_proj.bias"],
        ["model.norm.weight", "visual.proj"], ["lm_head.weight"]]
    assert all(b.numel * b.dtype.itemsize <= 0.1 * 2**20 or len(b.entries) == 1 for b in plan)
    assert [e.offset for e in plan[1].entries] == [0, 64 * 64]


def test_broadcast_reaches_every_receiver_bit_exactly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(r, 3, port, queue)) for r in range(3)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    expected_bytes = sum(v.numel() * v.element_size() for v in _weights().values())
    assert results == {0: expected_bytes, 1: True, 2: True}
