"""RewardRunner isolation: every failure mode is recorded against the right reward and sample, and
the run goes on (worker processes, real timeouts and kills)."""

import textwrap

import pytest

from rewards import RewardError, RewardInput, RewardRunner, RewardSpec

FAULTY = textwrap.dedent('''
    import asyncio, os, time

    def boom(sample):
        return 1 / (sample.index - 1)

    def nan(sample):
        return float("nan") if sample.index == 1 else 1.0

    def inf(sample):
        return {"score": float("-inf") if sample.index == 1 else 2.0, "extra": 3}

    def wrong_type(sample):
        return "1.0" if sample.index == 1 else 1.0

    def hang(sample):
        if sample.index == 1:
            time.sleep(120)
        return float(os.getpid())

    def die(sample):
        if sample.index == 1:
            os._exit(3)
        return 1.0

    def maybe(sample):
        return None if sample.index == 1 else 0.5

    def verl_none(data_source, solution_str, ground_truth, extra_info=None):
        return None

    _inflight = 0

    async def concurrent(sample):
        global _inflight
        _inflight += 1
        await asyncio.sleep(0.3)
        peak = _inflight
        _inflight -= 1
        return {"score": 1.0, "peak": peak}

    async def async_hang(sample):
        if sample.index == 1:
            await asyncio.sleep(120)
        return 1.0

    def batch_partial(samples):
        return [ValueError("bad sample") if s.index == 1 else 1.0 for s in samples]

    def batch_short(samples):
        return [1.0]

    def batch_sizes(samples):
        return [{"score": 1.0, "size": len(samples)} for _ in samples]

    def unknown(x, y):
        return 1.0
''')


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "faulty.py"
    path.write_text(FAULTY)
    return str(path)


def inputs(n, response="<think>x</think><answer>B</answer>"):
    row = {"id": "r", "question": "Which?", "options": ["Adenoma", "Carcinoma"], "answer": "B"}
    return [RewardInput.from_row(i, row, response) for i in range(n)]


def kinds(batch):
    return sorted((e.reward, e.index, e.kind) for e in batch.errors)


def test_exception_nan_inf_wrong_type_are_recorded_and_excluded(faulty, caplog):
    specs = [RewardSpec("acc", "mc_accuracy")] + [RewardSpec(n, f"{faulty}:{n}") for n in ("boom", "nan", "inf",
                                                                                          "wrong_type")]
    # The response holds code: it is only ever data for the rewards.
    with RewardRunner(specs) as runner:
        batch = runner.score(inputs(4, "<think>__import__('os')._exit(1)</think><answer>B</answer>"))
    assert kinds(batch) == [("boom", 1, "exception"), ("inf", 1, "nan"), ("nan", 1, "nan"), ("wrong_type", 1, "type")]
    boom = next(e for e in batch.errors if e.reward == "boom")
    assert "ZeroDivisionError" in boom.message and "faulty.py" in boom.message
    assert batch.scores[1] is None
    # boom: 1/(i-1) = -1, 1, 0.5 at i = 0, 2, 3; the others give 1 + 1 + 2 + 1.
    assert batch.scores[0] == pytest.approx(1 - 1 + 1 + 2 + 1)
    assert batch.scores[3] == pytest.approx(1 + 0.5 + 1 + 2 + 1)
    assert batch.components["nan"] == [1.0, None, 1.0, 1.0]
    assert batch.metrics["inf/extra"] == [3.0, None, 3.0, 3.0]
    assert batch.summary()["reward/errors"] == 4.0
    # What the run's log shows (engine/sampler.py calls this on every scored batch): each failure
    # with its reward, its kind and the message, not only a count.
    from engine.sampler import log_reward_errors

    with caplog.at_level("WARNING", logger="pathorl.sampler"):
        log_reward_errors(batch.errors, 4, most=3)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == f"reward 'boom' failed on 1 of 4 samples (exception): {boom.message}"
    assert len(lines) == 4 and "1 more distinct" in lines[3]


def test_hung_call_is_killed_worker_replaced_and_run_continues(faulty):
    with RewardRunner([RewardSpec("hang", f"{faulty}:hang")], num_workers=2, timeout_s=1.0) as runner:
        before = set(runner.worker_pids)
        # 24 samples on 2 workers: chunks of 3, so sample 2 shares the hanging call's chunk and is re-queued.
        first = runner.score(inputs(24))
        assert kinds(first) == [("hang", 1, "timeout")]
        assert first.scores[1] is None and all(s is not None for k, s in enumerate(first.scores) if k != 1)
        after = set(runner.worker_pids)
        assert len(after) == 2 and len(before & after) == 1  # exactly one worker was replaced
        assert first.scores[2] in after  # the hang reward returns the pid of the worker that scored
        second = runner.score(inputs(6)[2:])  # the same runner goes on
        assert second.errors == [] and runner.score([]).scores == []


def test_worker_death_is_an_error_not_a_crash(faulty):
    with RewardRunner([RewardSpec("die", f"{faulty}:die")], num_workers=1) as runner:
        batch = runner.score(inputs(5))
    assert kinds(batch) == [("die", 1, "exception")]
    assert "exit code 3" in batch.errors[0].message
    assert batch.scores == [1.0, None, 1.0, 1.0, 1.0]


def test_on_error_fallback_and_raise(faulty):
    specs = [RewardSpec("acc", "mc_accuracy", 2.0), RewardSpec("boom", f"{faulty}:boom", 1.0)]
    with RewardRunner(specs, on_error="fallback", fallback_score=-0.5) as runner:
        batch = runner.score(inputs(3))
    assert batch.components["boom"][1] == -0.5 and batch.scores[1] == pytest.approx(2.0 - 0.5)
    assert kinds(batch) == [("boom", 1, "exception")]
    with RewardRunner(specs, on_error="raise") as runner:
        with pytest.raises(RewardError, match="reward 'boom' failed on sample 1") as info:
            runner.score(inputs(3))
    assert info.value.kind == "exception" and info.value.index == 1


def test_none_is_not_applicable_for_native_but_an_error_for_verl(faulty):
    specs = [RewardSpec("maybe", f"{faulty}:maybe"), RewardSpec("acc", "mc_accuracy")]
    with RewardRunner(specs) as runner:
        batch = runner.score(inputs(3))
    assert batch.errors == [] and batch.components["maybe"] == [0.5, None, 0.5]
    assert batch.scores == pytest.approx([1.5, 1.0, 1.5])
    with RewardRunner([RewardSpec("maybe", f"{faulty}:maybe")]) as runner:
        batch = runner.score(inputs(2))
    assert batch.scores == [0.5, None] and kinds(batch) == [("maybe", 1, "nan")]
    with RewardRunner([RewardSpec("verl", f"{faulty}:verl_none")]) as runner:
        batch = runner.score(inputs(2))
    assert kinds(batch) == [("verl", 0, "type"), ("verl", 1, "type")]


def test_async_rewards_run_concurrently_and_time_out_in_place(faulty):
    with RewardRunner([RewardSpec("c", f"{faulty}:concurrent")], num_workers=1) as runner:
        batch = runner.score(inputs(8))
    assert batch.errors == [] and max(batch.metrics["c/peak"]) >= 2
    with RewardRunner([RewardSpec("h", f"{faulty}:async_hang")], num_workers=1, timeout_s=0.5) as runner:
        pids = runner.worker_pids
        batch = runner.score(inputs(4))
        assert runner.worker_pids == pids  # timed out inside the worker, no kill needed
    assert kinds(batch) == [("h", 1, "timeout")] and batch.scores == [1.0, None, 1.0, 1.0]


def test_batch_rewards_per_slot_errors_length_check_and_chunking(faulty):
    specs = [RewardSpec("partial", f"{faulty}:batch_partial"), RewardSpec("short", f"{faulty}:batch_short"),
             RewardSpec("whole", f"{faulty}:batch_sizes"), RewardSpec("chunks", f"{faulty}:batch_sizes", chunk_size=2)]
    with RewardRunner(specs) as runner:
        batch = runner.score(inputs(5))
    assert runner.styles == ["native_batch"] * 4
    assert [e for e in kinds(batch) if e[0] == "partial"] == [("partial", 1, "exception")]
    assert [e[2] for e in kinds(batch) if e[0] == "short"] == ["type"] * 5
    assert "1 values for 5 samples" in next(e.message for e in batch.errors if e.reward == "short")
    assert batch.metrics["whole/size"] == [5.0] * 5
    assert batch.metrics["chunks/size"] == [2.0, 2.0, 2.0, 2.0, 1.0]


def test_bad_references_fail_at_construction_with_clear_messages(faulty, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RewardRunner([RewardSpec("x", "missing.py:f")])
    with pytest.raises(ValueError, match="neither a built-in"):
        RewardRunner([RewardSpec("x", "not_a_builtin")])
    with pytest.raises(ValueError, match="has no function 'nope'"):
        RewardRunner([RewardSpec("x", f"{faulty}:nope")])
    with pytest.raises(ValueError, match="match no supported style"):
        RewardRunner([RewardSpec("x", f"{faulty}:unknown")])
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_xyz\n")
    with pytest.raises(ValueError, match="reward 'x' could not be loaded: ModuleNotFoundError"):
        RewardRunner([RewardSpec("x", f"{broken}:f")])
    with pytest.raises(ValueError, match="unique"):
        RewardRunner([RewardSpec("x", "mc_accuracy"), RewardSpec("x", "patho_r1_format")])
    with pytest.raises(ValueError, match="on_error"):
        RewardRunner([RewardSpec("x", "mc_accuracy")], on_error="ignore")
