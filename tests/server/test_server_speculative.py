"""`sluice serve --speculative-method ngram` (and `draft --draft-model self`): the same answers
as a server without it, streamed or whole, and the drafts' acceptance in /metrics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_server import ServerProcess, start_server

pytestmark = pytest.mark.slow

PROMPT = (
    "Copy this list exactly:\n1. apples and pears\n2. bread and butter\n3. salt and pepper\n"
    "4. fish and chips\n\nCopy:\n1."
)


@pytest.fixture(
    scope="module",
    # The draft: the model's own checkpoint at int4, which for the Q4_1 GGUF is its own weights.
    params=[("ngram",), ("draft", "--draft-model", "self")],
    ids=["ngram", "draft-self"],
)
def spec_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("spec-server") / "serve.log",
        *("--speculative-method", *request.param, "--num-speculative-tokens", "4"),
    )
    yield process
    assert process.stop() == 0, process.log_tail()


def complete(server: ServerProcess, stream: bool = False, **extra):
    oai = server.openai()
    return oai.completions.create(
        model=oai.models.list().data[0].id,
        prompt=PROMPT,
        max_tokens=40,
        temperature=0.0,
        stream=stream,
        extra_body={"ignore_eos": True, **extra},
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )


def test_answers_equal_a_plain_servers_streamed_or_whole(spec_server, server):
    plain = complete(server)
    whole = complete(spec_server)
    assert whole.choices[0].text == plain.choices[0].text
    assert whole.usage.completion_tokens == plain.usage.completion_tokens == 40
    chunks = list(complete(spec_server, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == 40


def test_metrics_show_the_acceptance(spec_server):
    before = spec_server.metrics()
    complete(spec_server)
    after = spec_server.metrics()

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    drafts = grew("sluice:spec_decode_num_drafts_total")
    accepted = grew("sluice:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and accepted > 0
    assert grew("sluice:spec_decode_num_draft_tokens_total") >= accepted
    assert grew('sluice:spec_decode_num_accepted_tokens_per_pos_total{position="0"}') > 0
    assert 0.0 < after["sluice:spec_decode_acceptance_rate"] <= 1.0
    assert after["sluice:spec_decode_mean_acceptance_length"] > 1.0
    # 40 tokens came from the drafting steps and the ones between: fewer steps than tokens.
    assert accepted + drafts <= 40


def test_a_request_may_opt_out(spec_server):
    before = spec_server.metrics()["sluice:spec_decode_num_drafts_total"]
    answer = complete(spec_server, speculative=False)
    assert answer.usage.completion_tokens == 40
    assert spec_server.metrics()["sluice:spec_decode_num_drafts_total"] == before
