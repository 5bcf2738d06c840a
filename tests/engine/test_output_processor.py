"""OutputProcessor on hand-built RequestUpdates: logprob dicts, n > 1, delta mode, stops."""

from __future__ import annotations

import pytest

from jaxpaged.engine.output_processor import OutputProcessor
from jaxpaged.engine.request import Request, RequestStatus
from jaxpaged.engine.scheduler_output import LogprobsLists, RequestUpdate
from jaxpaged.sampling_params import MAX_LOGPROBS, SamplingParams
from tests.tokenizer_utils import build_byte_level_tokenizer

PROMPT = [5, 6, 7]


def _setup(params, request_id="p"):
    tok = build_byte_level_tokenizer()
    proc = OutputProcessor(tok)
    child_ids = proc.add_request(request_id, "prompt", PROMPT, params, arrival_time=1.0)
    reqs = {cid: Request(cid, PROMPT, params, params.max_tokens or 16) for cid in child_ids}
    return proc, reqs, tok


def _update(req, token_ids, finished=False, status=None, logprobs=None):
    req.append_output_token_ids(token_ids)
    if finished:
        req.status = status or RequestStatus.FINISHED_LENGTH_CAPPED
    return RequestUpdate(req, token_ids, logprobs, finished)


def _ids(tok, text):
    return [i for ch in text for i in tok.encode(ch, add_special_tokens=False)]


def test_logprob_dict_when_sampled_token_is_outside_top_n():
    proc, reqs, tok = _setup(SamplingParams(max_tokens=2, logprobs=3))
    req = reqs["p"]
    top = list(range(100, 100 + MAX_LOGPROBS))
    top_lps = [-0.1 * (j + 1) for j in range(MAX_LOGPROBS)]
    row = LogprobsLists([[42, *top]], [[-7.5, *top_lps]], [57])
    proc.process_outputs([_update(req, [42], logprobs=row)], now=2.0)
    row2 = LogprobsLists([[100, *top]], [[-0.1, *top_lps]], [1])
    (out,) = proc.process_outputs(
        [_update(req, [100], True, logprobs=row2)], now=3.0
    ).request_outputs
    comp = out.outputs[0]
    first, second = comp.logprobs
    assert list(first) == [42, 100, 101, 102]  # sampled token first, then the top 3
    assert first[42].logprob == -7.5 and first[42].rank == 57
    assert [first[t].rank for t in (100, 101, 102)] == [1, 2, 3]
    assert first[101].logprob == pytest.approx(-0.2)
    assert first[101].decoded_token == tok.decode([101])
    assert list(second) == [100, 101, 102]  # sampled == top-1: one entry, not two
    assert comp.cumulative_logprob == pytest.approx(-7.6)
    assert out.metrics.first_token_time == 2.0 and out.metrics.finished_time == 3.0


def test_n_final_mode_waits_for_all_children_and_orders_by_index():
    proc, reqs, tok = _setup(SamplingParams(n=2, max_tokens=3))
    a, b = _ids(tok, "a")[0], _ids(tok, "b")[0]
    assert list(reqs) == ["0_p", "1_p"]
    res = proc.process_outputs([_update(reqs["1_p"], [b], True)])
    assert res.request_outputs == [] and proc.has_unfinished_requests()
    (out,) = proc.process_outputs([_update(reqs["0_p"], [a, a], True)]).request_outputs
    assert [(c.index, c.text) for c in out.outputs] == [(0, "aa"), (1, "b")]
    assert out.finished and out.prompt == "prompt" and not proc.has_unfinished_requests()


def test_delta_mode_returns_only_new_tokens_and_logprobs():
    proc, reqs, tok = _setup(SamplingParams(max_tokens=3, logprobs=0, output_kind="delta"))
    req = reqs["p"]
    ids = _ids(tok, "hey")
    outs = []
    for i, t in enumerate(ids):
        row = LogprobsLists([[t, *range(MAX_LOGPROBS)]], [[-1.0] * (MAX_LOGPROBS + 1)], [2])
        res = proc.process_outputs([_update(req, [t], i == 2, logprobs=row)])
        outs += res.request_outputs
    assert [o.outputs[0].text for o in outs] == ["h", "e", "y"]
    assert [o.outputs[0].token_ids for o in outs] == [[t] for t in ids]
    assert [len(o.outputs[0].logprobs) for o in outs] == [1, 1, 1]
    assert [o.outputs[0].cumulative_logprob for o in outs] == [-1.0, -2.0, -3.0]
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].outputs[0].finish_reason == "length"


def test_stop_string_returns_request_to_finish():
    proc, reqs, tok = _setup(SamplingParams(max_tokens=20, stop=["!!"]))
    req = reqs["p"]
    ids = _ids(tok, "hi!!")
    res = proc.process_outputs([_update(req, ids[:3])])
    assert res.reqs_to_finish == [] and res.request_outputs == []
    res = proc.process_outputs([_update(req, ids[3:])])
    assert res.reqs_to_finish == ["p"]
    (out,) = res.request_outputs
    assert out.outputs[0].text == "hi" and out.outputs[0].stop_reason == "!!"


def test_stop_string_on_the_length_capped_step_reports_stop():
    proc, reqs, tok = _setup(SamplingParams(max_tokens=2, stop=["ab"]))
    res = proc.process_outputs([_update(reqs["p"], _ids(tok, "ab"), True)])
    assert res.reqs_to_finish == []  # the scheduler already finished it
    comp = res.request_outputs[0].outputs[0]
    assert (comp.finish_reason, comp.stop_reason, comp.text) == ("stop", "ab", "")


def test_eos_text_is_left_out():
    proc, reqs, tok = _setup(SamplingParams(max_tokens=5, skip_special_tokens=False))
    req = reqs["p"]
    req.stop_reason = None
    upd = _update(req, _ids(tok, "ok") + [tok.eos_token_id], True, RequestStatus.FINISHED_STOPPED)
    comp = proc.process_outputs([upd]).request_outputs[0].outputs[0]
    assert comp.text == "ok" and comp.finish_reason == "stop" and comp.stop_reason is None
    assert comp.token_ids[-1] == tok.eos_token_id


def test_abort_by_child_id_drops_parent_and_ignores_late_updates():
    proc, reqs, tok = _setup(SamplingParams(n=3, max_tokens=5))
    proc.process_outputs([_update(reqs["2_p"], [70], True)])
    assert sorted(proc.abort_requests(["1_p"])) == ["0_p", "1_p"]  # 2_p already finished
    assert proc.abort_requests(["p", "nope"]) == []
    assert proc.process_outputs([_update(reqs["0_p"], [70])]).request_outputs == []
    assert not proc.has_unfinished_requests()


@pytest.mark.parametrize("n", [1, 2])
def test_final_mode_without_text_or_logprobs_skips_middle_steps_but_keeps_every_token(n):
    # No detokenizer and no logprobs: the steps between a child's first token and its last
    # are skipped, and its tokens are read off the Request. The output must not change.
    proc = OutputProcessor(None)  # no tokenizer: no detokenizer
    params = SamplingParams(n=n, max_tokens=4, detokenize=False)
    child_ids = proc.add_request("p", None, PROMPT, params, arrival_time=1.0)
    reqs = {cid: Request(cid, PROMPT, params, 4) for cid in child_ids}
    assert all(cid in proc._quiet for cid in child_ids)
    for step in range(4):
        last = step == 3
        updates = [_update(reqs[c], [10 * i + step], last) for i, c in enumerate(child_ids)]
        res = proc.process_outputs(updates, now=2.0 + step)
        if step < 3:
            assert res.request_outputs == []
    (out,) = res.request_outputs
    assert [c.token_ids for c in out.outputs] == [[10 * i + s for s in range(4)] for i in range(n)]
    assert [c.finish_reason for c in out.outputs] == ["length"] * n
    assert out.metrics.first_token_time == 2.0 and out.metrics.last_token_time == 5.0
    assert not proc._quiet and not proc.has_unfinished_requests()


def test_only_final_untexted_requests_without_logprobs_are_quiet():
    proc = OutputProcessor(build_byte_level_tokenizer())
    kinds = {
        "text": SamplingParams(),
        "delta": SamplingParams(detokenize=False, output_kind="delta"),
        "logprobs": SamplingParams(detokenize=False, logprobs=0),
        "quiet": SamplingParams(detokenize=False),
    }
    for rid, params in kinds.items():
        proc.add_request(rid, None, PROMPT, params, arrival_time=0.0)
    assert proc._quiet == {"quiet"}
    proc.abort_requests(["quiet"])
    assert not proc._quiet
