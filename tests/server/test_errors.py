"""Malformed, unauthorized, oversized and out-of-range requests: OpenAI-shaped errors, and
no request or KV block left behind."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as h:
        yield h


def _error(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    return err


def test_prompt_plus_max_tokens_too_long_names_both_numbers(http, server):
    body = {"model": MODEL_NAME, "prompt": [5] * 200, "max_tokens": 100}
    err = _error(http.post("/v1/completions", json=body), 400)
    assert f"maximum context length is {MAX_MODEL_LEN}" in err["message"]
    assert "300 tokens (200 in the prompt, 100 for the completion)" in err["message"]
    server.wait_idle()


def test_openai_client_raises_bad_request(server):
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=1000
        )
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong").models.list()


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("temperature", -0.5, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("n", 0, "n must be"),
        ("max_tokens", 0, "max_tokens"),
        ("logprobs", 21, "logprobs"),
        ("presence_penalty", 3.0, "presence_penalty"),
        ("logit_bias", {"abc": 1.0}, "logit_bias"),
    ],
)
def test_out_of_range_sampling_values(http, field, value, needle):
    body = {"model": MODEL_NAME, "prompt": "hi", field: value}
    assert needle in _error(http.post("/v1/completions", json=body), 400)["message"]


def test_chat_top_logprobs_above_limit(http):
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30}
    assert "logprobs" in _error(http.post("/v1/chat/completions", json=body), 400)["message"]


def test_malformed_json_and_wrong_types_are_400(http):
    resp = http.post(
        "/v1/completions", content=b'{"prompt": "hi",', headers={"Content-Type": "application/json"}
    )
    _error(resp, 400)
    _error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": "many"}), 400)
    _error(http.post("/v1/completions", json={"max_tokens": 3}), 400)  # prompt missing
    _error(http.post("/v1/chat/completions", json={"messages": "hello"}), 400)
    _error(http.post("/v1/chat/completions", json={"messages": []}), 400)
    _error(http.post("/v1/completions", json={"prompt": [], "max_tokens": 3}), 400)
    _error(http.post("/v1/completions", json={"prompt": [[5, -1]], "max_tokens": 3}), 400)


def test_unknown_model_is_404(http):
    err = _error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404)
    assert "gpt-9" in err["message"]


def test_api_key_required_on_v1_only(server):
    with httpx.Client(base_url=server.base_url) as h:
        _error(h.get("/v1/models"), 401)
        _error(h.post("/v1/completions", json={"prompt": "hi"}), 401)
        _error(h.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert h.get("/health").status_code == 200
        assert h.get("/v1/models", headers=AUTH).status_code == 200


def test_oversized_body_is_413(http, server):
    big = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    _error(
        http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413
    )

    def chunks():  # no Content-Length: the streamed size must be checked too
        yield b'{"prompt": "'
        for _ in range(9):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    resp = http.post(
        "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    _error(resp, 413)
    server.wait_idle()


def test_unknown_route_is_openai_shaped_404(http):
    _error(http.get("/v1/nothing-here"), 404)
