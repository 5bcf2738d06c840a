"""Property test: Scheduler + KVCacheManager over random workloads, checked after every step.

A fake runner mirrors what the real one does with a SchedulerOutput (keeps its own copy of
each request from NewRequestData / CachedRequestData / finished_req_ids) and simulates the
KV pool: every slot holds a key of the token prefix that produced it. Before any write of a
step, each scheduled request reads its history [0, num_computed_tokens) through its block
table and must find its own prefix there; so a wrong prefix hit, a salt leak, a block reused
while still held, or a hit on KV not written yet all fail.

With async scheduling the loop is pipelined as the engine runs it: step k+1 is scheduled
(and executed, since device steps run in order) before step k's output is applied.
"""

import dataclasses
import random
from collections import Counter, deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpaged.config import CacheConfig, SchedulerConfig
from jaxpaged.engine.kv_cache_manager import cdiv
from jaxpaged.engine.request import Request, RequestStatus
from jaxpaged.engine.scheduler import Scheduler
from jaxpaged.engine.scheduler_output import ModelRunnerOutput
from jaxpaged.sampling_params import SamplingParams

VOCAB = 6  # small, so that different requests often produce identical blocks
EOS = 5


@st.composite
def configs(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(6, 48))
    chunked = draw(st.booleans())
    max_num_seqs = draw(st.integers(1, 6))
    min_budget = max_num_seqs if chunked else max(max_num_seqs, max_model_len)
    budget = draw(st.integers(min_budget, min_budget + 40))
    max_blocks_per_req = cdiv(max_model_len - 1, block_size)
    num_usable = draw(st.integers(2, max(2, 2 * max_blocks_per_req)))
    sched_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        enable_chunked_prefill=chunked,
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 1, 3, 7])),
    )
    cache_config = CacheConfig(
        block_size=block_size,
        num_blocks=num_usable + 1,
        enable_prefix_caching=draw(st.booleans()),
    )
    return sched_config, cache_config


def make_requests(rng, sc, cc, num_requests):
    """(arrival step, Request) pairs that the engine would accept for this pool."""
    max_kv_tokens = min(sc.max_model_len, (cc.num_blocks - 1) * cc.block_size + 1)
    prefixes = [[rng.randrange(VOCAB) for _ in range(sc.max_model_len)] for _ in range(3)]
    out = []
    for i in range(num_requests):
        total = rng.randint(2, max_kv_tokens)  # prompt + max_tokens
        num_prompt = rng.randint(1, total - 1)
        prompt = rng.choice(prefixes)[: rng.randint(0, num_prompt)]
        prompt += [rng.randrange(VOCAB) for _ in range(num_prompt - len(prompt))]
        max_tokens = total - num_prompt
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=rng.randint(0, min(2, max_tokens)),
            stop_token_ids=rng.choice([[], [], [3]]),
            ignore_eos=rng.random() < 0.3,
        )
        params.update_from_generation_config({EOS})
        req = Request(
            f"r{i}", prompt, params, max_tokens,
            arrival_time=float(i), priority=rng.randint(0, 2),
            cache_salt=rng.choice([None, None, "s"]),
        )  # fmt: skip
        out.append((rng.randint(0, 3 * num_requests), req))
    return sorted(out, key=lambda x: x[0])


class FakeRunner:
    def __init__(self, block_size, rng):
        self.block_size = block_size
        self.rng = rng
        self.reqs = {}  # req_id -> {"tokens", "keys", "blocks", "computed"}
        self.kv = {}  # (block_id, offset) -> prefix key

    @staticmethod
    def _extend_keys(state):
        keys, tokens = state["keys"], state["tokens"]
        for p in range(len(keys), len(tokens)):
            keys.append(hash((keys[p - 1] if p else state["salt"], tokens[p])))

    def apply(self, sched, out):
        for rid in out.finished_req_ids:
            self.reqs.pop(rid, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.reqs, "new request the runner already holds"
            salt = sched.requests[new.req_id].cache_salt
            self.reqs[new.req_id] = {"tokens": list(new.token_ids), "keys": [], "salt": salt,
                                     "blocks": list(new.block_ids),
                                     "computed": new.num_computed_tokens}  # fmt: skip
        cached = out.scheduled_cached_reqs
        for rid, blocks, start in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens, strict=True
        ):
            state = self.reqs[rid]
            assert state["computed"] == start
            state["blocks"].extend(blocks)
        assert len(cached.req_ids) + len(out.scheduled_new_reqs) == len(out.num_scheduled_tokens)

    def execute(self, sched, out):
        bs, manager = self.block_size, sched.kv_cache_manager
        req_ids = list(out.num_scheduled_tokens)
        for rid in req_ids:  # all reads before any write of this step
            state = self.reqs[rid]
            self._extend_keys(state)
            assert state["blocks"] == manager.get_block_ids(rid)
            n = out.num_scheduled_tokens[rid]
            assert n > 0 and state["computed"] + n <= len(state["tokens"])
            assert len(state["blocks"]) * bs >= state["computed"] + n
            for p in range(state["computed"]):
                assert self.kv.get((state["blocks"][p // bs], p % bs)) == state["keys"][p], rid
        sampled = []
        for rid in req_ids:
            state, n = self.reqs[rid], out.num_scheduled_tokens[rid]
            for p in range(state["computed"], state["computed"] + n):
                block_id = state["blocks"][p // bs]
                assert manager.block_pool.blocks[block_id].ref_cnt == 1, "write to shared block"
                self.kv[(block_id, p % bs)] = state["keys"][p]
            state["computed"] += n
            if state["computed"] == len(state["tokens"]):
                token = self.rng.randrange(VOCAB)
                state["tokens"].append(token)
                sampled.append([token])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids, sampled)


def check_pool(sched):
    manager = sched.kv_cache_manager
    pool = manager.block_pool
    owners = Counter()
    for rid, blocks in manager.req_to_blocks.items():
        req = sched.requests[rid]
        assert req.status == RequestStatus.RUNNING, req
        assert len(set(map(id, blocks))) == len(blocks), f"{rid} holds a block twice"
        assert len(blocks) * manager.block_size >= req.num_computed_tokens
        owners.update(b.block_id for b in blocks)
    assert owners[0] == 0 and pool.null_block.ref_cnt == 0
    assert not pool.free_block_queue.contains(pool.null_block)
    for block in pool.blocks[1:]:
        assert block.ref_cnt == owners[block.block_id], block
        assert pool.free_block_queue.contains(block) == (block.ref_cnt == 0), block
        if block.ref_cnt > 1:
            assert block.block_hash is not None, "shared block that is not a cache hit"
    assert pool.get_num_free_blocks() == sum(1 for b in pool.blocks[1:] if b.ref_cnt == 0)
    for block_hash, block in pool.cached_block_hash_to_block.items():
        assert block.block_hash == block_hash
    assert len(sched.running) <= sched.scheduler_config.max_num_seqs


def check_finished(req, max_model_len):
    params = req.sampling_params
    for i, tok in enumerate(req.output_token_ids[:-1], 1):
        assert not (tok in params.all_stop_token_ids and i >= params.min_tokens), req
    if req.status == RequestStatus.FINISHED_STOPPED:
        assert req.output_token_ids[-1] in params.all_stop_token_ids
    elif req.status == RequestStatus.FINISHED_LENGTH_CAPPED:
        assert req.num_output_tokens == req.max_tokens or req.num_tokens == max_model_len
    else:
        assert req.status == RequestStatus.FINISHED_ABORTED


def _ends_in_flight(req, max_model_len):
    """Its token in flight reaches a length limit: async scheduling leaves it unscheduled."""
    n = req.num_output_placeholders
    return n > 0 and (
        req.num_output_tokens + n >= req.max_tokens
        or req.num_tokens_with_placeholders >= max_model_len
    )


def run_workload(sc, cc, seed, num_requests, async_scheduling=False, depth=1):
    """Run the workload as the engine does; under async scheduling up to `depth` scheduled
    steps are not applied yet when the next is scheduled (Engine.async_depth)."""
    rng = random.Random(seed)
    sc = dataclasses.replace(sc, async_scheduling=async_scheduling)
    sched = Scheduler(sc, cc)
    arrivals = make_requests(rng, sc, cc, num_requests)
    all_requests = [req for _, req in arrivals]
    runner = FakeRunner(cc.block_size, rng)
    step = 0
    in_flight = deque()  # async: (SchedulerOutput, runner output) not applied yet, oldest first

    def update(out, runner_output):
        if out.num_scheduled_tokens and rng.random() < 0.02:  # abort while the step runs
            rid = rng.choice(list(out.num_scheduled_tokens))
            sched.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
        updates = sched.update_from_output(out, runner_output)
        sampled = dict(zip(runner_output.req_ids, runner_output.sampled_token_ids, strict=True))
        for u in updates:
            assert u.new_token_ids == sampled[u.request.request_id]
            assert u.finished == u.request.is_finished()
        check_pool(sched)

    while arrivals or sched.has_unfinished_requests() or in_flight:
        while arrivals and arrivals[0][0] <= step:
            sched.add_request(arrivals.pop(0)[1])
        if sched.requests and rng.random() < 0.04:
            sched.finish_requests(rng.choice(list(sched.requests)), RequestStatus.FINISHED_ABORTED)
            check_pool(sched)
        out = sched.schedule()
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= sc.max_num_batched_tokens
        assert out.num_reqs <= sc.max_num_seqs
        assert out.preempted_req_ids <= out.finished_req_ids
        if sched.running and not out.total_num_scheduled_tokens:
            # Something always progresses (no deadlock, no idle step), unless every running
            # request's last token is in flight.
            assert all(_ends_in_flight(r, sc.max_model_len) for r in sched.running)
        for req in sched.requests.values():  # async: steps k..k+depth all in flight
            assert req.num_output_placeholders <= (depth + 1 if async_scheduling else 0), req
        check_pool(sched)
        runner.apply(sched, out)
        runner_output = runner.execute(sched, out)
        if async_scheduling:
            if out.num_scheduled_tokens:
                in_flight.append((out, runner_output))
            if len(in_flight) > depth or (in_flight and not out.num_scheduled_tokens):
                update(*in_flight.popleft())
        else:
            update(out, runner_output)
        step += 1
        assert step < 100 * (num_requests + 10), "no progress"
    runner.apply(sched, sched.schedule())
    assert runner.reqs == {}
    for req in all_requests:
        assert req.is_finished(), req
        check_finished(req, sc.max_model_len)
    assert sched.kv_cache_manager.get_num_free_blocks() == cc.num_blocks - 1
    return step, sched


def _property(max_examples):
    """Deterministic hypothesis settings; workloads vary in size, so no deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


WORKLOADS = dict(config=configs(), seed=st.integers(0, 2**32 - 1), num_requests=st.integers(1, 24))


@_property(400)
@given(**WORKLOADS)
def test_scheduler_invariants(config, seed, num_requests):
    sc, cc = config
    run_workload(sc, cc, seed, num_requests)


@_property(300)
@given(**WORKLOADS, depth=st.integers(1, 3))
def test_scheduler_invariants_async(config, seed, num_requests, depth):
    sc, cc = config
    run_workload(sc, cc, seed, num_requests, async_scheduling=True, depth=depth)


@pytest.mark.parametrize("async_scheduling,depth", [(False, 1), (True, 1), (True, 2)])
def test_fixed_workloads_run_thousands_of_steps(async_scheduling, depth):
    """A few hand-picked tight configurations, long enough to preempt and evict a lot."""
    total_steps = 0
    for policy in ("fcfs", "priority"):
        for caching in (True, False):
            sc = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=12, max_model_len=32,
                                 policy=policy, long_prefill_token_threshold=5)  # fmt: skip
            cc = CacheConfig(block_size=4, num_blocks=10, enable_prefix_caching=caching)
            steps, sched = run_workload(sc, cc, 1234, 100, async_scheduling, depth)
            stats = sched.make_stats()
            assert stats.num_preemptions_total > 0
            assert (stats.prefix_cache_hits_total > 0) == caching
            total_steps += steps
    assert total_steps > 1000
