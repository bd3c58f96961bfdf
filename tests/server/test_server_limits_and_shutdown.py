"""A second server with an API key on every endpoint but /health, one sequence at a time, a
queue of 16 sequences and a short shutdown timeout.

Its last test shuts it down, so the tests here run in file order (pytest's default).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import openai
import pytest
from live_server import MODEL_NAME, ServerProcess, start_server

pytestmark = pytest.mark.slow

API_KEY = "test-key"
LONG = {"prompt": "Tell me a long story.", "max_tokens": 500, "ignore_eos": True, "stream": True}
SHUTTING_DOWN = {
    "error": {
        "message": "the server is shutting down",
        "type": "server_error",
        "param": None,
        "code": "server_shutting_down",
    }
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--max-num-seqs", "1", "--max-queue", "16", "--shutdown-timeout", "3"]
    args += ["--auth-all-endpoints"]
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


@pytest.mark.parametrize("path", ["/metrics", "/version", "/docs", "/redoc", "/openapi.json"])
def test_auth_all_endpoints_guards_metrics_and_docs(limited: ServerProcess, path: str):
    refused = httpx.get(f"{limited.url}{path}")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    with limited.http() as http:
        assert http.get(path).status_code == 200


def test_health_stays_open(limited: ServerProcess):
    assert httpx.get(f"{limited.url}/health").json() == {"status": "ok"}


def num_waiting_settles_at(server: ServerProcess, expected: int) -> bool:
    """Whether the engine's count of waiting sequences reaches `expected` (commands reach the
    engine thread a moment after the response has started)."""
    deadline = time.monotonic() + 10
    while server.metrics()["sluice:num_requests_waiting"] != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_queue_counts_sequences_and_admits_a_request_whole_or_not_at_all(
    limited: ServerProcess,
):
    with limited.http() as http, http.stream("POST", "/v1/completions", json=LONG) as running:
        running_lines = running.iter_lines()  # kept: dropping the iterator would close the stream
        next(running_lines)  # it has a token: it runs, in the only sequence slot
        batch = {**LONG, "prompt": ["Hi", "Yo"], "n": 7}
        with http.stream("POST", "/v1/completions", json=batch) as waiting:
            assert waiting.status_code == 200  # admitted: 14 of the 16 places in the queue
            assert num_waiting_settles_at(limited, 14)
            refused = http.post("/v1/completions", json={"prompt": "Hi", "n": 3, "max_tokens": 1})
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert refused.json() == {
                "error": {
                    "message": "the server is at capacity: 14 sequences are already waiting, "
                    "this request brings 3 and at most 16 may wait",
                    "type": "server_error",
                    "param": None,
                    "code": "queue_full",
                }
            }
            with pytest.raises(openai.InternalServerError):  # what the official client raises
                limited.openai().completions.create(
                    model=MODEL_NAME, prompt="Hi", n=3, max_tokens=1
                )
            time.sleep(0.5)  # what was wrongly queued would have reached the engine by now
            assert num_waiting_settles_at(limited, 14)  # none of the refused requests queued
            with http.stream("POST", "/v1/completions", json={**LONG, "n": 2}) as fits:
                assert fits.status_code == 200  # 14 + 2: the queue's last places


def test_a_batch_larger_than_the_queue_is_a_400(limited: ServerProcess):
    with limited.http() as http:
        body = {"prompt": ["Hi"] * 500, "n": 8, "max_tokens": 4}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 400
        assert response.json()["error"] == {
            "message": "the request asks for 500 prompts x n=8 = 4000 sequences; "
            "this server takes at most 16 per request",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": None,
        }
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).is_success


def events(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line]


def test_sigterm_finishes_short_requests_and_ends_long_ones_with_an_error_event(
    limited: ServerProcess,
):
    short = {"prompt": "Hi", "max_tokens": 3, "ignore_eos": True, "stream": True}
    waited: list[httpx.Response] = []
    with limited.http() as http, ExitStack() as streams:
        finishing = streams.enter_context(http.stream("POST", "/v1/completions", json=short))
        lines = finishing.iter_lines()
        next(lines)
        cut_off = [
            streams.enter_context(http.stream("POST", route, json=body))
            for route, body in [
                ("/v1/completions", LONG),
                ("/v1/completions", {**LONG, "n": 2}),
                ("/v1/chat/completions", {**LONG, "messages": [{"role": "user", "content": "Hi"}]}),
            ]
        ]
        unstreamed = threading.Thread(
            target=lambda: waited.append(
                limited.http().post("/v1/completions", json={**LONG, "n": 3, "stream": False})
            )
        )
        unstreamed.start()
        # The streams bring 4 sequences besides the short one: at 7 the 3 unstreamed are in too.
        while (
            sum(limited.metrics()[f"sluice:num_requests_{s}"] for s in ("running", "waiting")) < 7
        ):
            time.sleep(0.05)
        limited.process.terminate()  # SIGTERM
        assert [line for line in lines if line][-1] == "data: [DONE]"
        for response in cut_off:  # each ends at --shutdown-timeout, and ends properly
            *_, error, done = events(response)
            assert error == f"data: {httpx.Response(200, json=SHUTTING_DOWN).text}"
            assert done == "data: [DONE]"
        unstreamed.join()
    assert waited[0].status_code == 503 and waited[0].json() == SHUTTING_DOWN
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(f"{limited.url}/health")
    assert limited.process.wait(timeout=60) == 0, limited.log_tail()
    assert "Traceback" not in limited.log_path.read_text(errors="replace")
