"""Scheduler: budget, seq cap, chunked prefill, preemption order, aborts, stop conditions."""

import pytest

from jaxpaged.config import CacheConfig, SchedulerConfig
from jaxpaged.engine.request import Request, RequestStatus
from jaxpaged.engine.scheduler import Scheduler
from jaxpaged.engine.scheduler_output import LogprobsLists, ModelRunnerOutput
from jaxpaged.sampling_params import SamplingParams

BS = 4


def make_scheduler(
    num_blocks=64,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    max_model_len=64,
    policy="fcfs",
    chunked=True,
    threshold=0,
    caching=True,
):
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            policy=policy,
            enable_chunked_prefill=chunked,
            long_prefill_token_threshold=threshold,
        ),
        CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=caching),
    )


def make_request(
    rid, num_prompt, max_tokens=8, priority=0, arrival=None, prompt=None, eos=(), **params
):
    sp = SamplingParams(max_tokens=max_tokens, **params)
    sp.update_from_generation_config(set(eos))
    if prompt is None:  # distinct per request id, so that only explicit prompts share a prefix
        prompt = [1000 * sum(map(ord, rid)) + i for i in range(num_prompt)]
    return Request(rid, prompt, sp, max_tokens, arrival_time=arrival, priority=priority, seed=7)


def run_step(sched, out, tokens=None, logprobs=None):
    """Fake runner: sample (tokens[rid] or 0) for every request whose tokens reached the end."""
    tokens = tokens or {}
    req_ids = list(out.num_scheduled_tokens)
    sampled = []
    for rid in req_ids:
        req = sched.requests.get(rid)
        done = req is not None and req.num_computed_tokens == req.num_tokens
        sampled.append([tokens.get(rid, 0)] if done else [])
    return sched.update_from_output(out, ModelRunnerOutput(req_ids, sampled, logprobs or {}))


def test_budget_chunks_prefill_and_mixes_with_decode():
    sched = make_scheduler(max_num_batched_tokens=10)
    sched.add_request(make_request("a", 6))
    sched.add_request(make_request("b", 12))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 6, "b": 4}
    assert out.total_num_scheduled_tokens == 10
    new = {n.req_id: n for n in out.scheduled_new_reqs}
    assert new["a"].block_ids == [1, 2] and new["b"].block_ids == [3]
    assert new["b"].token_ids == sched.requests["b"].prompt_token_ids and new["b"].seed == 7
    assert (new["a"].num_computed_tokens, new["b"].num_computed_tokens) == (0, 0)
    updates = run_step(sched, out, {"a": 42})
    assert [(u.request.request_id, u.new_token_ids) for u in updates] == [("a", [42])]

    out = sched.schedule()  # a decodes 1 token, b's next chunk takes the other 9... only 8 left
    assert out.num_scheduled_tokens == {"a": 1, "b": 8}
    assert out.scheduled_new_reqs == []
    cached = out.scheduled_cached_reqs
    assert cached.req_ids == ["a", "b"]
    assert cached.num_computed_tokens == [6, 4]
    assert cached.new_block_ids == [[], [4, 5]]
    updates = run_step(sched, out, {"a": 43, "b": 44})
    assert {u.request.request_id: u.new_token_ids for u in updates} == {"a": [43], "b": [44]}
    assert sched.requests["b"].all_token_ids[-1] == 44


def test_seq_cap():
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(make_request(rid, 3, max_tokens=1))
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == ["a", "b"]
    updates = run_step(sched, out)
    assert all(u.finished for u in updates)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"c": 3}
    assert out.finished_req_ids == {"a", "b"}


def test_long_prefill_threshold():
    sched = make_scheduler(threshold=3)
    sched.add_request(make_request("a", 8))
    chunks = []
    for _ in range(3):
        out = sched.schedule()
        chunks.append(out.num_scheduled_tokens["a"])
        run_step(sched, out)
    assert chunks == [3, 3, 2]
    assert sched.requests["a"].num_output_tokens == 1


def test_without_chunked_prefill_a_prompt_waits_for_the_whole_budget():
    sched = make_scheduler(max_num_batched_tokens=16, max_model_len=16, chunked=False)
    sched.add_request(make_request("a", 10, max_tokens=4))
    sched.add_request(make_request("b", 8, max_tokens=4))
    sched.add_request(make_request("c", 2, max_tokens=4))  # fits, but no skipping ahead of b
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 10}
    run_step(sched, out)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 8, "c": 2}


def test_chunked_prefill_off_needs_budget_for_max_model_len():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_scheduler(max_num_batched_tokens=16, max_model_len=32, chunked=False)


@pytest.mark.parametrize("depth", [0, -1])
def test_async_depth_below_one_is_refused(depth):
    with pytest.raises(ValueError, match=rf"async_depth must be >= 1, got {depth}"):
        SchedulerConfig(async_scheduling=True, async_depth=depth)


def test_preemption_fcfs_evicts_last_admitted_and_resumes_from_cache():
    sched = make_scheduler(num_blocks=5)  # 4 usable blocks
    sched.add_request(make_request("a", 8, max_tokens=2))
    sched.add_request(make_request("b", 8, max_tokens=2))
    out = sched.schedule()
    assert [n.block_ids for n in out.scheduled_new_reqs] == [[1, 2], [3, 4]]
    run_step(sched, out, {"a": 5, "b": 6})

    out = sched.schedule()  # a's 9th token needs a 3rd block: b is preempted
    b = sched.requests["b"]
    assert out.preempted_req_ids == {"b"} and out.finished_req_ids == {"b"}
    assert out.num_scheduled_tokens == {"a": 1}
    assert out.scheduled_cached_reqs.new_block_ids == [[4]]  # b's tail block, evicted first
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert sched.make_stats().num_preemptions_total == 1
    updates = run_step(sched, out)
    assert updates[0].finished and updates[0].request.request_id == "a"

    out = sched.schedule()  # b resumes with its output so far; its first block is a hit
    (resumed,) = out.scheduled_new_reqs
    assert resumed.req_id == "b" and resumed.token_ids == b.prompt_token_ids + [6]
    assert resumed.num_computed_tokens == 4 and resumed.block_ids == [3, 4, 2]
    assert out.num_scheduled_tokens == {"b": 5} and out.finished_req_ids == {"a"}
    assert b.num_cached_tokens == 0  # counted at first admission only


@pytest.mark.parametrize(
    "policy, victim, blocks_for_low", [("fcfs", "c", [1, 2, 6]), ("priority", "low", None)]
)
def test_preemption_victim_by_policy(policy, victim, blocks_for_low):
    sched = make_scheduler(num_blocks=7, policy=policy)  # 6 usable blocks
    sched.add_request(make_request("low", 7, priority=1, arrival=1.0))
    run_step(sched, sched.schedule())  # low: blocks 1, 2; 8 tokens
    sched.add_request(make_request("a", 7, priority=0, arrival=2.0))
    sched.add_request(make_request("c", 7, priority=0, arrival=3.0))
    out = sched.schedule()  # low's 8th token fits block 2; a, c take 3, 4 and 5, 6
    assert out.num_scheduled_tokens == {"low": 1, "a": 7, "c": 7}
    run_step(sched, out)

    out = sched.schedule()  # low's 9th token needs a block; none free
    assert out.preempted_req_ids == {victim}
    assert sched.requests[victim].status == RequestStatus.PREEMPTED
    others = [r for r in ("low", "a", "c") if r != victim]
    assert out.num_scheduled_tokens == dict.fromkeys(others, 1)
    if blocks_for_low is not None:
        assert sched.kv_cache_manager.get_block_ids("low") == blocks_for_low
    assert next(iter(sched.waiting)) is sched.requests[victim]


def test_priority_waiting_order_and_preempted_reinsertion():
    sched = make_scheduler(policy="priority", max_num_seqs=1, max_num_batched_tokens=8)
    sched.add_request(make_request("p2", 2, priority=2, arrival=1.0))
    sched.add_request(make_request("p0-late", 2, priority=0, arrival=3.0))
    sched.add_request(make_request("p0", 2, priority=0, arrival=2.0))
    sched.add_request(make_request("p1", 2, priority=1, arrival=0.0))
    assert [r.request_id for r in sched.waiting] == ["p0", "p0-late", "p1", "p2"]
    fcfs = make_scheduler(policy="fcfs")
    for rid in ("x", "y"):
        fcfs.add_request(make_request(rid, 2, arrival=5.0 if rid == "x" else 1.0))
    assert [r.request_id for r in fcfs.waiting] == ["x", "y"]  # fcfs: order of add_request


def test_abort_frees_blocks_at_once():
    sched = make_scheduler(num_blocks=10, max_num_batched_tokens=12)
    sched.add_request(make_request("run", 8))
    sched.add_request(make_request("wait", 20, max_tokens=4))  # gets a 4-token chunk
    sched.add_request(make_request("queued", 4))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"run": 8, "wait": 4}
    run_step(sched, out)
    assert sched.kv_cache_manager.get_num_free_blocks() == 9 - 3
    aborted = sched.finish_requests(["run", "queued", "nope"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in aborted] == ["run", "queued"]
    assert aborted[0].status == RequestStatus.FINISHED_ABORTED
    assert sched.kv_cache_manager.get_num_free_blocks() == 9 - 1
    assert set(sched.requests) == {"wait"} and sched.get_num_unfinished_requests() == 1
    out = sched.schedule()
    assert out.finished_req_ids == {"run", "queued"}
    assert out.num_scheduled_tokens == {"wait": 12}
    # Aborted while its step runs: the step's result for it is dropped.
    sched.finish_requests("wait", RequestStatus.FINISHED_ABORTED)
    assert run_step(sched, out) == []
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_manager.get_num_free_blocks() == 9
    assert sched.schedule().finished_req_ids == {"wait"}


def generate(sched, rid, tokens):
    """Feed `tokens` one per sampling step to request rid; return the final update."""
    for tok in tokens:
        out = sched.schedule()
        updates = run_step(sched, out, {rid: tok})
        if updates and updates[-1].finished:
            return updates[-1]
    return None


def test_stop_token_id_sets_stop_reason():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3, stop_token_ids=[7]))
    upd = generate(sched, "a", [5, 7, 9])
    assert upd.new_token_ids == [7] and upd.request.output_token_ids == [5, 7]
    assert upd.request.status == RequestStatus.FINISHED_STOPPED and upd.request.stop_reason == 7
    assert sched.kv_cache_manager.get_num_free_blocks() == 63
    assert sched.schedule().finished_req_ids == {"a"}


def test_eos_stops_without_stop_reason_unless_ignore_eos():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3, eos=[2]))
    upd = generate(sched, "a", [5, 2])
    assert upd.request.status == RequestStatus.FINISHED_STOPPED
    assert upd.request.stop_reason is None and upd.request.get_finish_reason() == "stop"
    sched.add_request(make_request("b", 3, max_tokens=3, eos=[2], ignore_eos=True))
    upd = generate(sched, "b", [2, 2, 2])
    assert upd.request.output_token_ids == [2, 2, 2]
    assert upd.request.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_min_tokens_defers_stop():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3, min_tokens=3, stop_token_ids=[7], eos=[2]))
    upd = generate(sched, "a", [7, 2, 7])
    assert upd.request.output_token_ids == [7, 2, 7]
    assert upd.request.status == RequestStatus.FINISHED_STOPPED


def test_max_tokens_and_stop_token_at_the_limit():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3, max_tokens=3))
    upd = generate(sched, "a", [1, 1, 1, 1])
    assert upd.request.num_output_tokens == 3
    assert upd.request.get_finish_reason() == "length"
    sched.add_request(make_request("b", 3, max_tokens=2, stop_token_ids=[7]))
    upd = generate(sched, "b", [1, 7])
    assert upd.request.get_finish_reason() == "stop" and upd.request.stop_reason == 7


def test_max_model_len_caps_length():
    sched = make_scheduler(max_model_len=8)
    req = make_request("a", 5, max_tokens=3)
    sched.add_request(req)
    # The engine keeps prompt + max_tokens <= max_model_len, so max_tokens normally trips
    # first; raise it here to reach the max_model_len backstop on its own.
    req.max_tokens = 100
    upd = generate(sched, "a", [1, 1, 1, 1])
    assert upd.request.num_tokens == 8 and upd.request.num_output_tokens == 3
    assert upd.request.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_update_carries_logprobs_and_stats():
    sched = make_scheduler()
    sched.add_request(make_request("a", 9, prompt=list(range(9))))
    lp = LogprobsLists(token_ids=[[5, 5, 6]], logprobs=[[-0.1, -0.1, -2.0]], ranks=[1])
    (upd,) = run_step(sched, sched.schedule(), {"a": 5}, {"a": lp})
    assert upd.new_logprobs is lp and not upd.finished
    sched.add_request(make_request("b", 10, prompt=list(range(10))))
    out = sched.schedule()
    (new,) = out.scheduled_new_reqs
    assert new.num_computed_tokens == 8 and out.num_scheduled_tokens == {"a": 1, "b": 2}
    assert sched.requests["b"].num_cached_tokens == 8
    stats = sched.make_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs) == (2, 0)
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (19, 8)
    # a: 3 blocks (9 tokens computed, 10th scheduled); b: shares 2, owns 1.
    assert stats.num_free_blocks == 63 - 4
    assert stats.kv_cache_usage == pytest.approx(4 / 63)


def test_lone_request_always_progresses_in_a_tight_pool():
    # Each request alone needs all 3 usable blocks: they must take turns, never deadlock.
    sched = make_scheduler(num_blocks=4, max_model_len=16)
    for rid in "abc":
        sched.add_request(make_request(rid, 6, max_tokens=7))
    finished, steps = [], 0
    while sched.has_unfinished_requests():
        steps += 1
        assert steps < 200
        out = sched.schedule()
        assert out.total_num_scheduled_tokens > 0
        finished += [u.request.request_id for u in run_step(sched, out, {}) if u.finished]
    assert sorted(finished) == ["a", "b", "c"]
    assert sched.kv_cache_manager.get_num_free_blocks() == 3
