"""A second server with an API key, one sequence at a time and a queue of one.

Its last test shuts it down, so the tests here run in file order (pytest's default).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from live_server import MODEL_NAME, ServerProcess, start_server

pytestmark = pytest.mark.slow

API_KEY = "test-key"
LONG = {"prompt": "Tell me a long story.", "max_tokens": 500, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--max-num-seqs", "1", "--max-queue", "1", "--shutdown-timeout", "3"]
    process = start_server(tmp_path_factory.mktemp("limited") / "serve.log", *args, api_key=API_KEY)
    yield process
    assert process.stop() == 0, process.log_tail()


def test_the_api_needs_the_key(limited: ServerProcess):
    body = {"prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        response = httpx.post(f"{limited.url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/v1/models", "/tokenize"):
        assert (
            httpx.request(
                "GET" if path == "/v1/models" else "POST", f"{limited.url}{path}"
            ).status_code
            == 401
        )


def test_a_non_ascii_key_is_refused_not_crashed(limited: ServerProcess):
    headers = {"Authorization": "Bearer clé".encode("latin-1")}
    assert httpx.get(f"{limited.url}/v1/models", headers=headers).status_code == 401


def test_the_right_key_opens_the_api(limited: ServerProcess):
    client = limited.openai()
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert (
        client.completions.create(
            model=MODEL_NAME, prompt="Hi", max_tokens=1
        ).usage.completion_tokens
        == 1
    )


def test_health_and_metrics_stay_open(limited: ServerProcess):
    assert httpx.get(f"{limited.url}/health").status_code == 200
    assert httpx.get(f"{limited.url}/metrics").status_code == 200


def test_a_full_queue_answers_503_with_retry_after(limited: ServerProcess):
    with limited.http() as http, http.stream("POST", "/v1/completions", json=LONG) as running:
        running_lines = running.iter_lines()  # kept: dropping the iterator would close the stream
        next(running_lines)  # it has a token: it runs, in the only sequence slot
        with http.stream("POST", "/v1/completions", json=LONG) as waiting:
            assert waiting.status_code == 200  # admitted: the one place in the queue
            refused = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.InternalServerError):  # what the official client raises
                limited.openai().completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=1)


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_0(limited: ServerProcess):
    short = {"prompt": "Hi", "max_tokens": 3, "ignore_eos": True, "stream": True}
    with limited.http() as http, http.stream("POST", "/v1/completions", json=short) as finishing:
        lines = finishing.iter_lines()
        next(lines)
        with http.stream("POST", "/v1/completions", json=LONG) as cut_off:
            limited.process.terminate()  # SIGTERM
            assert [line for line in lines if line][-1] == "data: [DONE]"
            with pytest.raises(httpx.RemoteProtocolError):  # closed at --shutdown-timeout
                list(cut_off.iter_lines())
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(f"{limited.url}/health")
    assert limited.process.wait(timeout=60) == 0, limited.log_tail()
