"""Every endpoint through the official `openai` client (sync and async, streaming and not),
and httpx for the non-OpenAI routes, against a real uvicorn server on a tiny random Llama."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME
from tests.tokenizer_utils import build_byte_level_tokenizer

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def _exact(**extra):
    """ignore_eos + max_tokens: the token count is exact even for a random model."""
    return {"extra_body": {"ignore_eos": True, **extra}}


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_completion_text_prompt(client, server):
    tok = build_byte_level_tokenizer()
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=7, **_exact())
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.index == 0
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.model == MODEL_NAME and r.object == "text_completion"
    server.wait_idle()


def test_completion_greedy_is_deterministic_and_seeded_sampling_repeats(client):
    kw = dict(model=MODEL_NAME, prompt="Hello world", max_tokens=8, **_exact())
    a = client.completions.create(temperature=0, **kw).choices[0].text
    b = client.completions.create(temperature=0, **kw).choices[0].text
    assert a == b
    s1 = client.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    s2 = client.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    assert s1 == s2


def test_completion_batch_of_token_prompts_with_n(client):
    r = client.completions.create(
        model=MODEL_NAME, prompt=[[5, 6, 7], [8, 9, 10, 11]], n=2, max_tokens=3, seed=1, **_exact()
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 12


def test_completion_logprobs_and_echo(client):
    prompt = "Hello"
    r = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=4, logprobs=3, echo=True, **_exact()
    )
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    n_prompt = len(build_byte_level_tokenizer().encode(prompt))
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[:n_prompt] == [None] * n_prompt
    for token, logprob, top in zip(lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:],
                                   lp.top_logprobs[n_prompt:], strict=True):  # fmt: skip
        assert logprob <= 0 and 3 <= len(top) <= 4 and top[token] == pytest.approx(logprob)
    assert lp.text_offset == sorted(lp.text_offset)


def test_completion_stream_with_usage(client):
    stream = client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=6, stream=True,
        stream_options={"include_usage": True}, **_exact(),
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    finish = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}


def test_completion_stop_string(client):
    # Generate once, then use a piece of that greedy text as the stop string.
    kw = dict(model=MODEL_NAME, prompt="Hello", temperature=0, max_tokens=12, **_exact())
    text = client.completions.create(**kw).choices[0].text
    stop = text[3:5]
    assert stop.strip(), f"greedy text too short for the test: {text!r}"
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.finish_reason == "stop" and r.text == text[: text.index(stop)]
    assert r.model_extra["stop_reason"] == stop


def test_chat_completion(client, server):
    tok = build_byte_level_tokenizer()
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2,
        **_exact(),
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))
    assert r.usage.completion_tokens == 5 and r.object == "chat.completion"
    content = choice.logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert math.isfinite(item.logprob)
    server.wait_idle()


def test_chat_stream_role_first_then_content(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, stream=True,
        stream_options={"include_usage": True}, **_exact(),
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_async_client_concurrent_streams(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY) as c:

            async def one(i):
                stream = await c.chat.completions.create(
                    model=MODEL_NAME, messages=[{"role": "user", "content": f"count {i}"}],
                    max_tokens=4 + i, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                text, usage = "", None
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                    usage = chunk.usage or usage
                return usage.completion_tokens

            completions = await c.completions.create(
                model=MODEL_NAME, prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True}
            )
            counts = await asyncio.gather(*(one(i) for i in range(6)))
            return completions.usage.completion_tokens, counts

    single, counts = asyncio.run(main())
    assert single == 3 and counts == [4 + i for i in range(6)]
    server.wait_idle()


def test_tokenize_detokenize(server):
    tok = build_byte_level_tokenizer()
    with httpx.Client(base_url=server.base_url) as h:
        r = h.post("/tokenize", json={"model": MODEL_NAME, "prompt": "Café 🙂"}).json()
        assert r["tokens"] == tok.encode("Café 🙂") and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == MAX_MODEL_LEN
        chat = h.post("/tokenize", json={"messages": MESSAGES}).json()
        rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False)
        d = h.post("/detokenize", json={"model": MODEL_NAME, "tokens": r["tokens"]}).json()
        assert d == {"prompt": "Café 🙂"}
        bad = h.post("/detokenize", json={"tokens": [10**6]})
        assert bad.status_code == 400 and "out of vocabulary" in bad.json()["error"]["message"]


def test_health_and_metrics(client, server):
    client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3, **_exact())
    with httpx.Client(base_url=server.base_url) as h:
        assert h.get("/health").status_code == 200
        text = h.get("/metrics").text
    for name in [
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_sum",
    ]:  # fmt: skip
        assert f"\n{name}" in text, name
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:") and "{" in line
    }
    assert values["vllm:generation_tokens_total"] >= 3
    assert values["vllm:time_to_first_token_seconds_count"] >= 1
    assert values["vllm:inter_token_latency_seconds_count"] >= 2
