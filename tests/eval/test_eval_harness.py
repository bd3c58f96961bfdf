"""`sluice eval` against transformers on a tiny model: sliding-window perplexity and
continuation log-likelihoods equal a direct computation (1e-4 relative); the CLI prints one JSON
line and names bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from sluice.bench.tiny_checkpoint import make_tiny_checkpoint
from sluice.cli import main
from sluice.eval.cli import SHIPPED_TASK
from sluice.eval.likelihood import loglikelihoods, read_choice_task
from sluice.eval.perplexity import perplexity
from sluice.models.registry import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint("llama", folder, seed=5)
    ours = load_model(folder, torch.device("cpu"), torch.float32, "none")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, ours, reference.eval()


def token_ids(count: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from transformers' logits."""
    logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize(("window", "stride"), [(24, None), (24, 10), (24, 3), (200, None)])
def test_perplexity_equals_transformers(tiny, window, stride):
    _, ours, reference = tiny
    ids = token_ids(101, seed=window)
    stride_ = stride or window
    nll, scored = 0.0, 0
    for start in range(0, len(ids) - 1, stride_):  # transformers' perplexity guide
        end = min(start + window, len(ids) - 1)
        nll -= reference_logprobs(reference, ids[start : end + 1])[scored - start :].sum().item()
        scored = end
        if end == len(ids) - 1:
            break
    expected = math.exp(nll / (len(ids) - 1))
    assert perplexity(ours, ids, window, stride) == pytest.approx(expected, rel=1e-4)


def test_loglikelihoods_equal_transformers(tiny):
    _, ours, reference = tiny
    context = token_ids(17, seed=1)
    continuations = [token_ids(n, seed=n) for n in (1, 3, 6)]
    got = loglikelihoods(ours, context, continuations)
    for continuation, value in zip(continuations, got, strict=True):
        expected = reference_logprobs(reference, context + continuation)[len(context) - 1 :]
        assert value == pytest.approx(expected.sum().item(), rel=1e-4)


def test_cli_prints_one_json_line(tiny, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i}" for i in token_ids(80, seed=2)))
    task = tmp_path / "task.jsonl"
    items = [
        {"context": "t5 t6 t7", "choices": [" t8", " t9 t10"], "answer": 1},
        {"context": "t11", "choices": [" t12", " t13", " t14"], "answer": 0},
    ]
    task.write_text("\n".join(json.dumps(item) for item in items))
    argv = ["eval", "--model", str(tiny[0]), "--quantization", "none", "--text", str(text)]
    assert main([*argv, "--window", "32", "--stride", "16", "--task", str(task)]) == 0
    result = json.loads(capsys.readouterr().out)
    ids = tiny[1].tokenizer.encode(text.read_text())
    assert result["tokens"] == len(ids) and result["window"] == 32 and result["stride"] == 16
    assert result["perplexity"] == pytest.approx(perplexity(tiny[1], ids, 32, 16))
    assert result["items"] == 2 and result["acc"] in (0.0, 0.5, 1.0)
    assert result["weight_bytes"] == 2 * 4 * (3 * 64 * 128 + 2 * 64 * 64 + 2 * 64 * 32)


def test_bad_task_line_is_named(tiny, tmp_path, capsys):
    task = tmp_path / "bad.jsonl"
    task.write_text('{"context": "t5", "choices": [" t6"], "answer": 0}\n{"context": "t5"}\n')
    assert main(["eval", "--model", str(tiny[0]), "--text", "none", "--task", str(task)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_shipped_task_has_four_choices_an_item():
    items = read_choice_task(SHIPPED_TASK)
    assert len(items) == 104 and all(len(item.choices) == 4 for item in items)
