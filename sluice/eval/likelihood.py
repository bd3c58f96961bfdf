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

from sluice.eval.forward import prompts_hidden
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


def split_tokens(
    tokenizer: Tokenizer, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-eval splits them: the whole text encoded once and cut
    after the context's own encoding (so a merge across the boundary goes to the continuation)."""
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    if whole[: len(context_ids)] != context_ids:
        return context_ids, tokenizer.encode(continuation, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


@torch.inference_mode()
def loglikelihoods(loaded: LoadedModel, requests: list[tuple[list[int], list[int]]]) -> list[float]:
    """Sum of log p(continuation token | everything before it) per (context, continuation) pair;
    the pairs run side by side in one forward pass."""
    model = loaded.model
    sequences = [context + continuation for context, continuation in requests]
    scores = []
    for (context, continuation), hidden in zip(
        requests, prompts_hidden(model, [seq[:-1] for seq in sequences]), strict=True
    ):
        rows = hidden[len(context) - 1 :]
        logprobs = torch.log_softmax(model.compute_logits(rows), dim=-1)
        targets = torch.tensor(continuation, device=logprobs.device)
        scores.append(logprobs.gather(1, targets[:, None]).sum().item())
    return scores


def evaluate_choices(loaded: LoadedModel, items: list[ChoiceItem], progress: bool = False) -> dict:
    """acc and acc_norm (likelihood per byte of the choice) over `items`."""
    correct = correct_norm = 0
    for item in tqdm(items, unit="item", desc="likelihood", disable=not progress):
        requests = [split_tokens(loaded.tokenizer, item.context, c) for c in item.choices]
        scores = loglikelihoods(loaded, requests)
        per_byte = [s / max(1, len(c.encode())) for s, c in zip(scores, item.choices, strict=True)]
        correct += _argmax(scores) == item.answer
        correct_norm += _argmax(per_byte) == item.answer
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": len(items)}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
