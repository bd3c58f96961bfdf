"""Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness's `loglikelihood`
requests: each choice's continuation is scored given the context, and the most likely choice is
the model's answer (`acc`), or the most likely per byte of its text (`acc_norm`).

A task is a JSONL file, one item a line: {"context": str, "choices": [str, ...], "answer": int}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sluice.eval.forward import continuations_hidden
from sluice.loaders.tokenizer import Tokenizer
from sluice.models.registry import LoadedModel


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    answer: int


def read_choice_task(path: Path) -> list[ChoiceItem]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            item = ChoiceItem(raw["context"], tuple(raw["choices"]), int(raw["answer"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{path}:{number}: expected {{'context': str, 'choices': [str, ...], "
                f"'answer': int}}: {error}"
            ) from None
        if not 0 <= item.answer < len(item.choices):
            raise ValueError(f"{path}:{number}: answer {item.answer} is not a choice's index")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def continuation_tokens(
    tokenizer: Tokenizer, context: str, context_ids: list[int], continuation: str
) -> list[int]:
    """The continuation's ids as lm-eval splits them: context and continuation encoded together
    and cut after the context's own ids (so a merge across the boundary goes to the
    continuation); encoded alone where the joint encoding changes the context's ids."""
    whole = tokenizer.encode(context + continuation)
    if whole[: len(context_ids)] != context_ids:
        return tokenizer.encode(continuation, add_special_tokens=False)
    return whole[len(context_ids) :]


@torch.inference_mode()
def loglikelihoods(
    loaded: LoadedModel, context: list[int], continuations: list[list[int]]
) -> list[float]:
    """Sum of log p(token | everything before it) over each continuation's tokens after
    `context`, which is computed once for all of them."""
    if not context or not all(continuations):
        raise ValueError("a likelihood request needs a non-empty context and continuation")
    model = loaded.model
    context_hidden, hidden = continuations_hidden(model, context, continuations)
    scores = []
    for continuation, rows in zip(continuations, hidden, strict=True):
        # Each token is predicted at the position before it: the context's last, then its own.
        rows = torch.cat([context_hidden[-1:], rows[:-1]])
        logprobs = torch.log_softmax(model.compute_logits(rows), dim=-1)
        targets = torch.tensor(continuation, device=logprobs.device)
        scores.append(logprobs.gather(1, targets[:, None]).sum().item())
    return scores


def evaluate_choices(loaded: LoadedModel, items: list[ChoiceItem], progress: bool = False) -> dict:
    """acc and acc_norm (likelihood per byte of the choice) over `items`."""
    correct = correct_norm = 0
    for item in tqdm(items, unit="item", desc="likelihood", disable=not progress):
        scores = _choice_scores(loaded, item)
        per_byte = [s / max(1, len(c.encode())) for s, c in zip(scores, item.choices, strict=True)]
        correct += _argmax(scores) == item.answer
        correct_norm += _argmax(per_byte) == item.answer
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": len(items)}


def _choice_scores(loaded: LoadedModel, item: ChoiceItem) -> list[float]:
    context = loaded.tokenizer.encode(item.context)
    continuations = [
        continuation_tokens(loaded.tokenizer, item.context, context, choice)
        for choice in item.choices
    ]
    return loglikelihoods(loaded, context, continuations)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
