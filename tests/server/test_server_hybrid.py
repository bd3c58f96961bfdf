"""`sluice serve` with a hybrid model (tiny random Qwen3-Next): the same API, the state pool in
/metrics, prefix-cache hits reported in usage, and streams equal to whole answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_server import ServerProcess, start_server

from sluice.bench.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.slow

SYSTEM = " ".join(f"t{300 + i}" for i in range(40))  # 40 word tokens: ten 4-token pages


@pytest.fixture(scope="module")
def hybrid_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("tiny-qwen3-next")
    make_tiny_checkpoint("qwen3_next", folder)
    process = start_server(
        folder / "serve.log",
        *("--model", str(folder), "--page-size", "4", "--max-num-batched-tokens", "16"),
    )
    yield process
    assert process.stop() == 0, process.log_tail()


def complete(server: ServerProcess, prompt: str, stream: bool = False):
    return server.openai().completions.create(
        model=server.openai().models.list().data[0].id,
        prompt=prompt,
        max_tokens=6,
        temperature=0.0,
        stream=stream,
        extra_body={"ignore_eos": True},
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )


def test_shared_prefix_hits_are_reported_and_change_nothing(hybrid_server):
    first = complete(hybrid_server, SYSTEM + " t7 t8")
    assert first.usage.prompt_tokens == 42 and first.usage.completion_tokens == 6
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = complete(hybrid_server, SYSTEM + " t7 t8")
    assert again.choices[0].text == first.choices[0].text
    # Chunks ran 0-16-32-40-42: the prompt's last whole page ended a chunk, so its state was
    # checkpointed there and the repeat starts from it.
    assert again.usage.prompt_tokens_details.cached_tokens == 40


def test_stream_equals_the_whole_answer(hybrid_server):
    whole = complete(hybrid_server, SYSTEM + " t9")
    chunks = list(complete(hybrid_server, SYSTEM + " t9", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


def test_metrics_show_the_state_pool(hybrid_server):
    complete(hybrid_server, SYSTEM + " t10 t11 t12")
    metrics = hybrid_server.metrics()
    assert metrics["sluice:state_slots_total"] > 0
    assert metrics["sluice:state_checkpoints"] >= 1
    assert metrics["sluice:state_slots_used"] == metrics["sluice:state_checkpoints"]  # all idle
