"""The real Engine, Scheduler and OutputProcessor driven by a scripted fake model runner."""

from __future__ import annotations

import pytest

from jaxpaged.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from jaxpaged.engine.engine import Engine
from jaxpaged.engine.scheduler_output import LogprobsLists, ModelRunnerOutput, SchedulerOutput
from jaxpaged.sampling_params import MAX_LOGPROBS, SamplingParams
from tests.tokenizer_utils import build_byte_level_tokenizer


class FakeModelRunner:
    """Follows the runner contract (tracks each request's tokens from the diffs it gets) and
    samples `script(req_id, output_index)`; logprobs are a fixed, checkable function of it."""

    def __init__(self, script, vocab_size: int) -> None:
        self.script = script
        self.vocab_size = vocab_size
        self.num_tokens: dict[str, int] = {}
        self.num_prompt: dict[str, int] = {}
        self.params: dict[str, SamplingParams] = {}
        self.seeds: dict[str, int] = {}
        self.num_steps = 0

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.num_steps += 1
        for req_id in out.finished_req_ids:
            self.num_tokens.pop(req_id, None)
        starts = {}
        for new in out.scheduled_new_reqs:
            self.num_tokens[new.req_id] = len(new.token_ids)
            self.num_prompt[new.req_id] = new.num_prompt_tokens
            self.params[new.req_id] = new.sampling_params
            self.seeds[new.req_id] = new.seed
            starts[new.req_id] = new.num_computed_tokens
        cached = out.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        req_ids, sampled, logprobs = [], [], {}
        for req_id, num in out.num_scheduled_tokens.items():
            req_ids.append(req_id)
            if starts[req_id] + num < self.num_tokens[req_id]:
                sampled.append([])  # partial prefill chunk
                continue
            index = self.num_tokens[req_id] - self.num_prompt[req_id]
            token = self.script(req_id, index)
            self.num_tokens[req_id] += 1
            sampled.append([token])
            if self.params[req_id].logprobs is not None:
                logprobs[req_id] = self.logprobs_for(token, index)
        return ModelRunnerOutput(req_ids, sampled, logprobs)

    # Async scheduling: the fake computes at dispatch (device steps run in order) and hands
    # the result back at collect, after the engine has scheduled and dispatched the next step.
    def dispatch(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model(out)

    def collect(self, handle: ModelRunnerOutput) -> ModelRunnerOutput:
        return handle

    def logprobs_for(self, token: int, index: int) -> LogprobsLists:
        top = [(token + j) % self.vocab_size for j in range(MAX_LOGPROBS)]
        lps = [-0.5 * (j + 1) - index for j in range(MAX_LOGPROBS)]
        return LogprobsLists([[token, *top]], [[lps[0], *lps]], [1])


@pytest.fixture(
    autouse=True, params=[(False, 1), (True, 1), (True, 2)], ids=["sync", "async1", "async2"]
)
def async_scheduling(request, monkeypatch):
    """Every engine test runs with synchronous scheduling and with async scheduling at
    depth 1 (one unread step when the next is scheduled, the default) and 2."""
    monkeypatch.setattr(f"{__name__}.ASYNC_SCHEDULING", request.param)
    return request.param


ASYNC_SCHEDULING = (False, 1)


def make_engine(script, num_blocks=64, max_model_len=128, block_size=4, **sched):
    sched.setdefault("async_scheduling", ASYNC_SCHEDULING[0])
    sched.setdefault("async_depth", ASYNC_SCHEDULING[1])
    tok = build_byte_level_tokenizer()
    model = ModelConfig(
        model_type="llama", vocab_size=len(tok), hidden_size=8, intermediate_size=16,
        num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, eos_token_ids=(tok.eos_token_id,),
    )  # fmt: skip
    config = EngineConfig(
        model=model,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_model_len=max_model_len, **sched),
    )
    runner = FakeModelRunner(script, len(tok))
    return Engine(config, runner, tok, seed=0), runner, tok


def text_script(tok, text):
    """Every request emits `text`, one character (or byte) per token, then repeats it."""
    ids = [i for ch in text for i in tok.encode(ch, add_special_tokens=False)]
    return lambda req_id, index: ids[index % len(ids)]


def run_all(engine, max_steps=500):
    outputs = []
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("engine did not finish")


def test_generates_until_max_tokens():
    tok = build_byte_level_tokenizer()
    engine, _, _ = make_engine(text_script(tok, "Hello world"))
    prompt_ids = tok.encode("The quick brown fox")
    engine.add_request("r0", "The quick brown fox", prompt_ids, SamplingParams(max_tokens=5))
    (out,) = run_all(engine)
    assert out.request_id == "r0" and out.finished and out.prompt_token_ids == prompt_ids
    (comp,) = out.outputs
    assert comp.text == "Hello" and len(comp.token_ids) == 5
    assert comp.finish_reason == "length" and comp.stop_reason is None
    assert comp.logprobs is None and comp.cumulative_logprob is None
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
    assert m.first_token_time <= m.last_token_time <= m.finished_time
    stats = engine.get_stats()
    assert stats.prompt_tokens_total == len(prompt_ids)
    assert stats.generation_tokens_total == 5
    assert stats.scheduler.num_running_reqs == 0 and stats.num_unfinished_requests == 0


def test_eos_and_stop_token_ids():
    tok = build_byte_level_tokenizer()
    eos = tok.eos_token_id
    world = tok.encode("w", add_special_tokens=False)[0]
    engine, _, _ = make_engine(lambda r, i: [65, 66, eos if r == "eos" else world][i % 3])
    engine.add_request("eos", None, [5, 6], SamplingParams(max_tokens=10))
    engine.add_request(
        "stop_id", None, [5, 6], SamplingParams(max_tokens=10, stop_token_ids=[world])
    )
    engine.add_request("min", None, [5, 6], SamplingParams(max_tokens=10, min_tokens=4))
    outs = {o.request_id: o.outputs[0] for o in run_all(engine)}
    assert outs["eos"].finish_reason == "stop" and outs["eos"].stop_reason is None
    assert outs["eos"].token_ids[-1] == eos and "<|im_end|>" not in outs["eos"].text
    assert outs["stop_id"].stop_reason == world and len(outs["stop_id"].token_ids) == 3
    # The script emits EOS only for "eos"; "min" gets [65, 66, w, ...] up to max_tokens.
    assert outs["min"].finish_reason == "length" and len(outs["min"].token_ids) == 10


def test_min_tokens_suppresses_eos_stop():
    tok = build_byte_level_tokenizer()
    eos = tok.eos_token_id
    engine, _, _ = make_engine(lambda r, i: eos if i in (1, 4) else 65)
    engine.add_request("r", None, [5], SamplingParams(max_tokens=10, min_tokens=3))
    (out,) = run_all(engine)
    assert out.outputs[0].token_ids == [65, eos, 65, 65, eos]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens_finishes_request(include):
    tok = build_byte_level_tokenizer()
    engine, runner, _ = make_engine(text_script(tok, "abc STOP def"))
    free = engine.get_stats().scheduler.num_free_blocks
    params = SamplingParams(max_tokens=50, stop=["STOP"], include_stop_str_in_output=include)
    engine.add_request("r", None, [5, 6, 7], params)
    (out,) = run_all(engine)
    comp = out.outputs[0]
    assert comp.text == ("abc STOP" if include else "abc ")
    assert comp.finish_reason == "stop" and comp.stop_reason == "STOP"
    assert len(comp.token_ids) == len("abc STOP")
    # Async: the steps after the one that produced "P" were dispatched before "P" was seen.
    assert runner.num_steps == len("abc STOP") + engine.async_scheduling * engine.async_depth
    assert engine.get_stats().scheduler.num_free_blocks == free
    assert not engine.scheduler.has_unfinished_requests()
    assert engine.step() == [] and not runner.num_tokens  # the next step tells the runner


def test_delta_mode_streams_text_and_holds_back_stop_prefix():
    tok = build_byte_level_tokenizer()
    engine, _, _ = make_engine(text_script(tok, "x ST yz STOP!"))
    params = SamplingParams(max_tokens=50, stop=["STOP"], output_kind="delta")
    engine.add_request("r", None, [5, 6], params)
    outs = run_all(engine)
    texts = [o.outputs[0].text for o in outs]
    assert "".join(texts) == "x ST yz "
    assert all(not t.endswith(("S", "ST", "STO")) for t in texts)
    assert sum(len(o.outputs[0].token_ids) for o in outs) == len("x ST yz STOP")
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    assert outs[-1].outputs[0].finish_reason == "stop"


def test_n_final_mode_aggregates_children_with_own_seeds():
    tok = build_byte_level_tokenizer()
    letters = tok.encode("abc", add_special_tokens=False)
    engine, runner, _ = make_engine(lambda r, i: letters[int(r.split("_")[0])])
    engine.add_request("p", "x", [5, 6, 7, 8, 9], SamplingParams(n=3, max_tokens=4, seed=10))
    (out,) = run_all(engine)
    assert out.request_id == "p" and out.finished
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.text for c in out.outputs] == ["aaaa", "bbbb", "cccc"]
    assert runner.seeds == {"0_p": 10, "1_p": 11, "2_p": 12}
    assert all(p.n == 1 for p in runner.params.values())


def test_n_delta_mode_uses_child_index():
    tok = build_byte_level_tokenizer()
    letters = tok.encode("ab", add_special_tokens=False)
    engine, runner, _ = make_engine(lambda r, i: letters[int(r.split("_")[0])])
    engine.add_request("p", None, [5, 6], SamplingParams(n=2, max_tokens=3, output_kind="delta"))
    outs = run_all(engine)
    text = {0: "", 1: ""}
    for o in outs:
        assert o.request_id == "p"
        for c in o.outputs:
            text[c.index] += c.text
    assert text == {0: "aaa", 1: "bbb"}
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    # Without a seed each child draws its own.
    assert runner.seeds["0_p"] != runner.seeds["1_p"]


def test_abort_parent_aborts_children_and_frees_blocks():
    engine, runner, _ = make_engine(lambda r, i: 65)
    free = engine.get_stats().scheduler.num_free_blocks
    engine.add_request("p", None, list(range(5, 25)), SamplingParams(n=3, max_tokens=50))
    engine.add_request("q", None, [5, 6], SamplingParams(max_tokens=4))
    outs = engine.step() + engine.step()
    assert engine.get_stats().scheduler.num_free_blocks < free
    engine.abort_request(["p", "unknown-id"])
    outs += run_all(engine)
    assert [o.request_id for o in outs] == ["q"]
    engine.step()
    assert engine.get_stats().scheduler.num_free_blocks == free
    assert not engine.scheduler.has_unfinished_requests()
    assert not runner.num_tokens  # the runner was told to drop every request


def test_logprobs_dict_shape():
    engine, runner, tok = make_engine(lambda r, i: 70 + i)
    engine.add_request("r", None, [5, 6], SamplingParams(max_tokens=3, logprobs=2))
    (out,) = run_all(engine)
    comp = out.outputs[0]
    assert len(comp.logprobs) == 3
    for i, entry in enumerate(comp.logprobs):
        token = 70 + i
        # Sampled token first; the fake's top-1 is the sampled token itself, so 2 entries.
        assert list(entry) == [token, token + 1]
        assert entry[token].logprob == -0.5 - i and entry[token].rank == 1
        assert entry[token + 1].rank == 2 and entry[token + 1].logprob == -1.0 - i
        assert entry[token].decoded_token == tok.decode([token])
    assert comp.cumulative_logprob == pytest.approx(sum(-0.5 - i for i in range(3)))


@pytest.mark.parametrize(
    "prompt_len, max_tokens, match",
    [
        (100, 40, r"maximum context length is 128 tokens.*140 tokens \(100 in the prompt, 40 "),
        (128, None, r"maximum context length is 128 tokens.*prompt has 128 tokens"),
        (0, 4, "prompt is empty"),
    ],
)
def test_length_validation(prompt_len, max_tokens, match):
    engine, _, _ = make_engine(lambda r, i: 65)
    with pytest.raises(ValueError, match=match):
        engine.add_request("r", None, [5] * prompt_len, SamplingParams(max_tokens=max_tokens))
    assert not engine.has_unfinished_requests()


def test_other_validation_errors():
    engine, _, tok = make_engine(lambda r, i: 65, num_blocks=8, max_model_len=128)
    with pytest.raises(ValueError, match=rf"Token id {len(tok)} .*\[0, {len(tok)}\)"):
        engine.add_request("r", None, [5, len(tok)], SamplingParams())
    with pytest.raises(ValueError, match="Token id -1"):
        engine.add_request("r", None, [-1], SamplingParams())
    # 7 usable blocks of 4 tokens hold 28 KV tokens: 20 + 9 - 1 = 28 fits, 20 + 10 - 1 not.
    engine.add_request("fits", None, [5] * 20, SamplingParams(max_tokens=9))
    with pytest.raises(ValueError, match="needs 8 KV cache blocks.*holds only 7"):
        engine.add_request("big", None, [5] * 20, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("fits", None, [5], SamplingParams())
    assert engine.get_num_unfinished_requests() == 1


def test_max_tokens_none_runs_to_max_model_len():
    engine, _, _ = make_engine(lambda r, i: 65, max_model_len=32)
    engine.add_request("r", None, [5] * 20, SamplingParams(max_tokens=None))
    (out,) = run_all(engine)
    assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].finish_reason == "length"


def test_chunked_prefill_and_prefix_cache_hits_are_reported():
    engine, _, _ = make_engine(lambda r, i: 65, max_num_batched_tokens=8, max_num_seqs=4)
    prompt = list(range(5, 30))
    engine.add_request("a", None, prompt, SamplingParams(max_tokens=2))
    (a,) = run_all(engine)
    engine.add_request("b", None, prompt, SamplingParams(max_tokens=2))
    (b,) = run_all(engine)
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 24  # 6 full blocks of 4
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == [65, 65]
    assert engine.get_stats().scheduler.prefix_cache_hits_total == 24
