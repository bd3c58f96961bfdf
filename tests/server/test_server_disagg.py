"""Prefill/decode disaggregation end to end: real `sluice serve --role prefill` and `--role decode`
processes on loopback, KV (and a hybrid model's state) moved over NIXL (UCX over TCP), driven by
vllm-router as a deployment would, or by hand as the router does (P, then D with P's params).

Each answer must equal what a single `both` server gives (greedy); afterwards both sides' pages
must be back to idle: every used page the prefix cache's, no lease, no pull in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from live_server import (
    MODEL_NAME,
    ServerProcess,
    free_port,
    launch_server,
    wait_until_healthy,
)

from sluice.bench.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.slow

UCX = {"UCX_TLS": "tcp"}  # loopback TCP: no RDMA here
# Three servers load at once on two shared cores: more time than one alone is given.
STARTUP_TIMEOUT_S = 400.0
LEASE_S = 6.0
STALL_S = 3.0  # the hybrid P serves no pull for this long after each prefill
PAGE_SIZE = 16
MAX_TOKENS = 8
PROMPTS = [
    "The weather today is",
    "Write a short poem about the sea, with rhymes, in the style of an old sailor's song:",
    "In the year 2050, cities will",
]
CHATS = [
    "What is the capital of France?",
    "Give me three tips for learning to play the piano as an adult beginner.",
]


@dataclass
class Cluster:
    prefill: ServerProcess
    decode: ServerProcess
    faulty_decode: ServerProcess  # fails half of its pulls, and then the request
    router_url: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("pd")
    servers = [
        launch_server(folder / "prefill.log", *_role("prefill", LEASE_S), env=UCX),
        launch_server(folder / "decode.log", "--role", "decode", env=UCX),
        launch_server(
            folder / "faulty.log",
            *("--role", "decode", "--pd-inject-transfer-errors", "0.5"),
            *("--pd-on-transfer-failure", "error"),
            env=UCX,
        ),
    ]
    _wait_for_all(servers)
    prefill, decode, faulty = servers
    command = ["vllm-router", "--vllm-pd-disaggregation", "--policy", "round_robin"]
    command += ["--prefill", prefill.url, "--decode", decode.url]
    try:  # a router that fails to start, or a failed test, leaves no server running
        with _router(command, folder / "vllm-router.log") as router_url:
            yield Cluster(prefill, decode, faulty, router_url)
    finally:
        _stop_all(servers)


def _wait_for_all(servers) -> None:
    """All healthy, or all stopped: one that fails to start leaves no other running."""
    try:
        for server in servers:
            wait_until_healthy(server, STARTUP_TIMEOUT_S)
    except BaseException:
        _stop_all(servers)
        raise


def _stop_all(servers) -> None:
    """SIGTERM to all, then wait: they shut down side by side."""
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    for server in servers:
        server.process.wait(60)


def _role(role: str, lease_s: float) -> tuple[str, ...]:
    return ("--role", role, "--pd-lease-seconds", str(lease_s))


class _router:
    """A router (`command`, a Rust binary from its wheel) in front of the servers."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.port = free_port()
        # The wheels put the binaries beside this Python, which need not be on PATH.
        binary = str(Path(sys.executable).parent / command[0])
        command = [binary, *command[1:], "--port", str(self.port)]
        command += ["--prometheus-port", str(free_port())]
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> str:
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.close()
                raise AssertionError(f"{self.process.args[0]} exited")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.__exit__()
        raise AssertionError(f"{self.process.args[0]} did not start")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        self.log.close()


def _reference(server: ServerProcess) -> tuple[list[str], list[str]]:
    """What one `both` server answers, greedy."""
    oai = server.openai()
    completions = [
        oai.completions.create(model=MODEL_NAME, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
        .choices[0]
        .text
        for p in PROMPTS
    ]
    chats = [
        oai.chat.completions.create(
            model=MODEL_NAME, messages=_chat(c), max_tokens=MAX_TOKENS, temperature=0
        )
        .choices[0]
        .message.content
        for c in CHATS
    ]
    return completions, chats


def _chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


async def _completion(client: openai.AsyncOpenAI, prompt: str, stream: bool) -> str:
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    if not stream:
        return (await client.completions.create(**kwargs)).choices[0].text
    chunks = await client.completions.create(**kwargs, stream=True)
    return "".join([c.choices[0].text async for c in chunks if c.choices])


async def _chat_answer(client: openai.AsyncOpenAI, content: str, stream: bool) -> str:
    kwargs = dict(model=MODEL_NAME, messages=_chat(content), max_tokens=MAX_TOKENS, temperature=0)
    if not stream:
        return (await client.chat.completions.create(**kwargs)).choices[0].message.content
    chunks = await client.chat.completions.create(**kwargs, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])


async def _everything(base_url: str) -> tuple[list[str], list[str]]:
    """Every prompt and chat, streaming and not, all at once: [plain..., streamed...]."""
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    completions = asyncio.gather(
        *(_completion(client, p, stream) for stream in (False, True) for p in PROMPTS)
    )
    chats = asyncio.gather(
        *(_chat_answer(client, c, stream) for stream in (False, True) for c in CHATS)
    )
    return list(await completions), list(await chats)


def _assert_idle(*servers: ServerProcess, timeout: float = 15.0) -> None:
    """Every used page is the prefix cache's (state slots: its checkpoints'); no lease is held and
    no pull is under way. Leases end a little after D's notification: poll for a while."""
    for server in servers:
        deadline = time.monotonic() + timeout
        while True:
            m = server.metrics()
            idle = {
                "pages": m["sluice:kv_cache_pages_used"] == m["sluice:kv_cache_pages_cached"],
                "leases": m["sluice:pd_leases"] == 0 and m["sluice:pd_leased_pages"] == 0,
                "pulls": m["sluice:pd_pulls_in_flight"] == 0,
                "running": m["sluice:num_requests_running"] == 0,
            }
            if "sluice:state_slots_used" in m:
                idle["slots"] = m["sluice:state_slots_used"] == m["sluice:state_checkpoints"]
            if all(idle.values()):
                break
            assert time.monotonic() < deadline, f"{server.url} not idle: {idle}"
            time.sleep(0.2)


def _prefill(server: ServerProcess, body: dict, path: str = "/v1/completions") -> dict:
    """What the router sends P: max_tokens 1, no stream, do_remote_decode."""
    request = {**body, "max_tokens": 1, "stream": False}
    request["kv_transfer_params"] = {"do_remote_decode": True}
    with server.http() as http:
        reply = http.post(path, json=request)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _decode(server: ServerProcess, body: dict, params: dict) -> dict:
    with server.http() as http:
        reply = http.post("/v1/completions", json={**body, "kv_transfer_params": params})
    assert reply.status_code == 200, reply.text
    return reply.json()


def _body(prompt: str | list[int], max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


# ---- through vllm-router -----------------------------------------------------------------------


def test_router_answers_equal_a_single_server(cluster: Cluster, server: ServerProcess):
    completions, chats = _reference(server)
    before = cluster.decode.metrics()
    got_completions, got_chats = asyncio.run(_everything(cluster.router_url))
    assert got_completions == completions * 2
    assert got_chats == chats * 2
    after = cluster.decode.metrics()
    num_requests = 2 * (len(PROMPTS) + len(CHATS))
    pulls = after["sluice:pd_pulls_completed"] - before["sluice:pd_pulls_completed"]
    assert (
        pulls + after["sluice:pd_pulls_failed"] - before["sluice:pd_pulls_failed"] == num_requests
    )
    assert pulls >= num_requests - 2, "most pulls should complete within the lease"
    assert after["sluice:pd_pulled_bytes"] > before["sluice:pd_pulled_bytes"]
    _assert_idle(cluster.prefill, cluster.decode)
    assert cluster.prefill.metrics()["sluice:pd_leases_released"] >= pulls


def test_a_second_turn_pulls_only_the_pages_decode_lacks(cluster: Cluster):
    client = openai.OpenAI(base_url=f"{cluster.router_url}/v1", api_key="unused", max_retries=0)
    conversation = _chat(
        "Describe, in a few sentences, how a lighthouse keeper spent a stormy night long ago."
    )

    def turn() -> tuple[openai.types.chat.ChatCompletion, dict, dict]:
        before = cluster.decode.metrics()
        reply = client.chat.completions.create(
            model=MODEL_NAME, messages=conversation, max_tokens=MAX_TOKENS, temperature=0
        )
        return reply, before, cluster.decode.metrics()

    first, *_ = turn()
    conversation += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And what did he do the next morning?"},
    ]
    second, before, after = turn()
    prompt_pages = math.ceil(second.usage.prompt_tokens / PAGE_SIZE)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # D's own prefix cache holds the first turn's prompt (its whole pages, at least).
    assert cached >= first.usage.prompt_tokens // PAGE_SIZE * PAGE_SIZE > 0
    assert after["sluice:pd_cached_pages"] - before["sluice:pd_cached_pages"] == cached // PAGE_SIZE
    pulled = after["sluice:pd_pulled_pages"] - before["sluice:pd_pulled_pages"]
    assert pulled == prompt_pages - cached // PAGE_SIZE
    _assert_idle(cluster.prefill, cluster.decode)


def test_sglang_router_drives_the_same_pair(
    cluster: Cluster, server: ServerProcess, tmp_path: Path
):
    """sglang-router sends P and D the request at once, with a bootstrap room; D asks P's side
    channel (at the bootstrap port: P's HTTP port) for the room's params."""
    completions, chats = _reference(server)
    prefill, decode = cluster.prefill, cluster.decode
    command = ["sglang-router", "launch", "--pd-disaggregation", "--policy", "round_robin"]
    command += ["--prefill", prefill.url, str(prefill.port), "--decode", decode.url]
    before = decode.metrics()["sluice:pd_pulls_completed"]
    with _router(command, tmp_path / "sglang-router.log") as url:
        assert asyncio.run(_everything(url)) == (completions * 2, chats * 2)
    assert decode.metrics()["sluice:pd_pulls_completed"] >= before + 8
    _assert_idle(prefill, decode)


def test_decode_takes_a_bootstrap_room_before_prefill_has_it(
    cluster: Cluster, server: ServerProcess
):
    """sglang-router's concurrent dispatch, by hand and in the worst order: D gets the request
    before P does. D admits it at once, its pages allocated, and pulls when P's params come."""
    prompt = "List the rooms of an old stone castle, from the cellar up to the tower:"
    (expected,) = [c.text for c in server.openai().completions.create(**_body(prompt)).choices]
    prefill, decode = cluster.prefill, cluster.decode
    body = {**_body(prompt), "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.port}
    body["bootstrap_room"] = 4242
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_post, decode, body)
        _wait_for(decode, lambda m: m["sluice:pd_awaiting_params"] == 1)
        m = decode.metrics()
        assert m["sluice:kv_cache_pages_used"] > m["sluice:kv_cache_pages_cached"]
        _post(prefill, body)  # as sglang-router sends it: P keeps the KV for the room
        assert answer.result(timeout=120)["choices"][0]["text"] == expected
    _assert_idle(prefill, decode)


def _post(server: ServerProcess, body: dict) -> dict:
    with server.http() as http:
        reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _wait_for(server: ServerProcess, condition, timeout: float = 60.0) -> None:
    """Until `condition(metrics)` holds."""
    deadline = time.monotonic() + timeout
    while not condition(server.metrics()):
        assert time.monotonic() < deadline, f"{server.url}: the metrics never got there"
        time.sleep(0.02)


def test_router_facing_endpoints(cluster: Cluster):
    with cluster.decode.http() as http:
        info = http.get("/server_info").json()
        assert info["disaggregation_mode"] == "decode" and info["page_size"] == PAGE_SIZE
        assert http.get("/model_info").json()["architecture"] == "llama"
        load = http.get("/get_load").json()
        assert load["num_reqs"] == 0 and 0.0 <= load["kv_cache_usage"] < 1.0
    m = cluster.decode.metrics()
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == pytest.approx(
        m["sluice:kv_cache_pages_used"] / m["sluice:kv_cache_pages_total"]
    )


# ---- P and D by hand, as the router drives them ------------------------------------------------


def test_a_request_for_the_wrong_role_is_refused(cluster: Cluster, server: ServerProcess):
    with server.http() as http:
        reply = http.post(
            "/v1/completions",
            json={**_body("Hi"), "kv_transfer_params": {"do_remote_decode": True}},
        )
    assert reply.status_code == 400
    assert "--role prefill" in reply.json()["error"]["message"]
    params = _prefill(cluster.prefill, _body("Hello there"))["kv_transfer_params"]
    other_prompt = _body("Hello there, friend")  # not the prompt P computed
    with cluster.decode.http() as http:
        reply = http.post("/v1/completions", json={**other_prompt, "kv_transfer_params": params})
    assert reply.status_code == 400 and "prompt tokens" in reply.json()["error"]["message"]
    _assert_idle(cluster.decode)


def test_injected_transfer_errors_fail_only_their_requests(cluster: Cluster, server: ServerProcess):
    """`--pd-on-transfer-failure error`: a request whose pull fails gets a clean error (a 503,
    or P's first token then an error event in its stream); the others are answered."""
    completions, _ = _reference(server)
    faulty = cluster.faulty_decode
    before = faulty.metrics()

    async def prefill_then_decode(http: httpx.AsyncClient, prompt: str, stream: bool):
        kv = (await asyncio.to_thread(_prefill, cluster.prefill, _body(prompt)))[
            "kv_transfer_params"
        ]
        body = {**_body(prompt), "kv_transfer_params": kv, "stream": stream}
        if not stream:
            reply = await http.post("/v1/completions", json=body)
            if reply.status_code != 200:
                assert reply.status_code == 503, reply.text
                return "", reply.json()["error"]
            return reply.json()["choices"][0]["text"], None
        text, error = "", None
        async with http.stream("POST", "/v1/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    error = event.get("error", error)
                    text += "".join(c["text"] for c in event.get("choices", []))
        return text, error

    async def all_at_once():
        async with httpx.AsyncClient(base_url=faulty.url, timeout=120) as http:
            return await asyncio.gather(
                *(prefill_then_decode(http, p, s) for s in (False, True) for p in PROMPTS)
            )

    answers = asyncio.run(all_at_once())
    m = faulty.metrics()
    failed = m["sluice:pd_pulls_failed"] - before["sluice:pd_pulls_failed"]
    completed = m["sluice:pd_pulls_completed"] - before["sluice:pd_pulls_completed"]
    injected = m['sluice:pd_pulls_failed_by_cause{cause="injected"}']
    assert failed + completed == len(answers)
    # Half of the pulls that get as far as the draw fail (seeded: 3 of the first 6). A loaded
    # machine may let a lease run out first: that fails the request too.
    assert injected >= 1 and completed >= 1
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == failed
    for error in errors:
        assert error["code"] == "kv_transfer_failed" and error["type"] == "server_error"
        assert "--pd-on-transfer-failure error" in error["message"]
    for (text, error), expected in zip(answers, completions * 2, strict=True):
        if error is None:
            assert text == expected
        else:  # a stream has P's first token before the error; a plain answer has nothing
            assert expected.startswith(text)
    _assert_idle(cluster.prefill, faulty)


def test_an_expired_lease_is_reclaimed_and_decode_recomputes(
    cluster: Cluster, server: ServerProcess
):
    prompt = " ".join(PROMPTS * 3)  # long enough that recomputing it takes a while
    (expected,) = [
        c.text for c in server.openai().completions.create(**_body(prompt), stream=False).choices
    ]
    expired_before = cluster.prefill.metrics()["sluice:pd_leases_expired"]
    params = _prefill(cluster.prefill, _body(prompt))["kv_transfer_params"]
    assert cluster.prefill.metrics()["sluice:pd_leases"] == 1
    time.sleep(LEASE_S + 0.5)
    _assert_idle(cluster.prefill)
    assert cluster.prefill.metrics()["sluice:pd_leases_expired"] == expired_before + 1
    # D gets the first token (sampled on P) at once, then recomputes the prompt itself.
    failed_before = cluster.decode.metrics()["sluice:pd_pulls_failed"]
    start, arrivals, text = time.monotonic(), [], ""
    with cluster.decode.http() as http:
        body = {**_body(prompt), "stream": True, "kv_transfer_params": params}
        with http.stream("POST", "/v1/completions", json=body) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic() - start)
                    text += httpx.Response(200, content=line[6:]).json()["choices"][0]["text"]
    assert text == expected
    assert arrivals[0] < arrivals[1] / 2, f"the first token waited for the prefill: {arrivals}"
    assert cluster.decode.metrics()["sluice:pd_pulls_failed"] == failed_before + 1
    _assert_idle(cluster.decode)


def test_decode_killed_mid_pull_leaves_prefill_idle(cluster: Cluster):
    """D dies with its pull under way (or before it starts): P's lease ends, at the latest when
    it expires, and its pages go back."""
    prompt = " ".join(PROMPTS * 3)
    params = _prefill(cluster.prefill, _body(prompt))["kv_transfer_params"]
    faulty = cluster.faulty_decode
    body = {**_body(prompt), "stream": True, "kv_transfer_params": params}
    with (
        faulty.http() as http,
        contextlib.suppress(httpx.HTTPError),  # the answer breaks off
        http.stream("POST", "/v1/completions", json=body) as reply,
    ):
        next(reply.iter_lines())  # the first token: D has the request
        faulty.process.kill()
    faulty.process.wait(10)
    _assert_idle(cluster.prefill, timeout=LEASE_S + 5)


def test_prefill_killed_before_the_pull_decode_recomputes(cluster: Cluster, server: ServerProcess):
    prompt = PROMPTS[1]
    (expected,) = [c.text for c in server.openai().completions.create(**_body(prompt)).choices]
    params = _prefill(cluster.prefill, _body(prompt))["kv_transfer_params"]
    cluster.prefill.process.kill()
    cluster.prefill.process.wait(10)
    reply = _decode(cluster.decode, _body(prompt), params)
    assert reply["choices"][0]["text"] == expected
    _assert_idle(cluster.decode)


# ---- a hybrid model: KV and recurrent state ------------------------------------------------------


@pytest.fixture(scope="module")
def hybrid_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ...]]:
    folder = tmp_path_factory.mktemp("tiny-qwen3-next-pd")
    make_tiny_checkpoint("qwen3_next", folder)
    model = ("--model", str(folder), "--page-size", "4", "--max-num-batched-tokens", "16")
    pair = (
        launch_server(
            folder / "prefill.log",
            *(*model, *_role("prefill", 30), "--pd-inject-serve-stall", str(STALL_S)),
            env=UCX,
        ),
        launch_server(folder / "decode.log", *model, "--role", "decode", env=UCX),
    )
    _wait_for_all(pair)
    yield pair
    _stop_all(pair)


def test_hybrid_state_moves_with_the_kv(hybrid_pair):
    prefill, decode = hybrid_pair
    name = prefill.openai().models.list().data[0].id
    for words in (" ".join(f"t{300 + i}" for i in range(21)), "t5 t6 t7"):
        body = {**_body(words, 8), "model": name, "ignore_eos": True}
        with prefill.http() as http:  # the reference: P answering on its own
            expected = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        params = _prefill(prefill, body)["kv_transfer_params"]
        assert params["remote_state_slot"] is not None
        before = decode.metrics()["sluice:pd_pulls_completed"]
        assert _decode(decode, body, params)["choices"][0]["text"] == expected
        assert decode.metrics()["sluice:pd_pulls_completed"] == before + 1
    _assert_idle(prefill, decode)


def test_mismatched_instances_are_named(hybrid_pair, cluster: Cluster):
    """A D given a P of another model says so at the first transfer."""
    hybrid_prefill, _ = hybrid_pair
    name = hybrid_prefill.openai().models.list().data[0].id
    params = _prefill(hybrid_prefill, {**_body([5, 6, 7]), "model": name})["kv_transfer_params"]
    with cluster.decode.http() as http:
        reply = http.post(
            "/v1/completions", json={**_body([5, 6, 7]), "kv_transfer_params": params}
        )
    assert reply.status_code == 400
    assert "disagree on model" in reply.json()["error"]["message"]


def test_prefill_killed_mid_transfer_decode_recomputes(hybrid_pair):
    """P stalls its side of every transfer for a while (`--pd-inject-serve-stall`), so D's pull
    is under way when P dies: D recomputes the prompt (the same answer), and its pages and
    state slot come back."""
    prefill, decode = hybrid_pair
    name = prefill.openai().models.list().data[0].id
    words = " ".join(f"t{400 + i}" for i in range(13))
    body = {**_body(words, 8), "model": name, "ignore_eos": True}
    expected = _post(prefill, body)["choices"][0]["text"]
    before = decode.metrics()
    params = _prefill(prefill, body)["kv_transfer_params"]
    stalled_until = time.monotonic() + STALL_S
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_decode, decode, body, params)
        _wait_for(decode, lambda m: m["sluice:pd_pulls_in_flight"] == 1)
        prefill.process.kill()
        assert time.monotonic() < stalled_until, "too slow: P may have served the pull"
        prefill.process.wait(10)
        assert answer.result(timeout=120)["choices"][0]["text"] == expected
    after = decode.metrics()
    assert after["sluice:pd_pulls_failed"] == before["sluice:pd_pulls_failed"] + 1
    assert after["sluice:pd_pulls_completed"] == before["sluice:pd_pulls_completed"]
    _assert_idle(decode)
