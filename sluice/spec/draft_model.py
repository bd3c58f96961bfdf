"""The draft model of `--speculative-method draft`: which checkpoint, loaded how, and the check
that it speaks the target's vocabulary (a draft token is fed to the target as it is)."""

from __future__ import annotations

from pathlib import Path

import torch

from sluice.config import SELF_DRAFT, SpeculativeConfig
from sluice.loaders.model_path import resolve_model
from sluice.loaders.tokenizer import Tokenizer
from sluice.models.registry import LoadedModel, load_model

# Encoded by both tokenizers: the same ids, or they split text differently.
SAMPLE_TEXT = (
    "Speculative decoding: 12 drafts, 3.5x faster? Ça dépend — naïve café 日本語 <tag>\n\t"
)


class VocabularyMismatchError(ValueError):
    """The draft model's vocabulary is not the target's."""


def draft_quantization(config: SpeculativeConfig) -> str:
    """auto: a draft checkpoint loads as `quantization=auto` loads it; the target's own
    checkpoint ("self") drafts at 4 bits, which is the point of drafting with it."""
    if config.draft_quantization == "auto" and config.draft_model == SELF_DRAFT:
        return "int4"
    return config.draft_quantization


def load_draft(
    config: SpeculativeConfig,
    target: LoadedModel,
    target_quantization: str,
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedModel:
    """The draft model, checked against the target's vocabulary; the target itself where the
    draft would load the same weights (no second copy in memory)."""
    path = target.path if config.draft_model == SELF_DRAFT else resolve_model(config.draft_model)
    quantization = draft_quantization(config)
    same = path.resolve() == target.path.resolve()
    if same and _same_weights(path, quantization, target_quantization):
        draft = target
    else:
        draft = load_model(path, device, dtype, quantization)
    if draft.config.is_hybrid:
        raise ValueError(
            f"draft model {path}: a hybrid model ({draft.config.architecture}) cannot draft, "
            "its recurrent state cannot be rolled back"
        )
    if draft is not target:
        check_same_vocabulary(target, draft)
    return draft


def _same_weights(path: Path, quantization: str, other: str) -> bool:
    """Whether loading `path` with either quantization gives the same weights: a GGUF's
    quantized blocks are kept as they are by every setting but none (see `Linear.load`)."""
    return quantization == other or (path.suffix == ".gguf" and "none" not in (quantization, other))


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise `VocabularyMismatchError` naming every way the draft's vocabulary differs: the
    logits' size, the special tokens, the first token whose text differs, the split of a
    sample text."""
    differences = _differences(target, draft)
    if differences:
        raise VocabularyMismatchError(
            f"draft model {draft.path} does not share the target's vocabulary ({target.path}): "
            + "; ".join(differences)
        )


def _differences(target: LoadedModel, draft: LoadedModel) -> list[str]:
    ours, theirs = target.tokenizer, draft.tokenizer
    pairs = {
        "vocabulary size": (target.config.vocab_size, draft.config.vocab_size),
        "tokenizer size": (ours.vocab_size, theirs.vocab_size),
        "bos token id": (ours.bos_token_id, theirs.bos_token_id),
        "end-of-generation token ids": (sorted(ours.eos_token_ids), sorted(theirs.eos_token_ids)),
        f"ids of {SAMPLE_TEXT!r}": (_split(ours), _split(theirs)),
    }
    differences = [
        f"{what} {mine} (draft) vs {wanted} (target)"
        for what, (wanted, mine) in pairs.items()
        if wanted != mine
    ]
    token = _first_different_token(target, draft)
    if token is not None:
        differences.append(
            f"token {token} is {theirs.id_to_token(token)!r} (draft) vs "
            f"{ours.id_to_token(token)!r} (target)"
        )
    return differences


def _split(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)


def _first_different_token(target: LoadedModel, draft: LoadedModel) -> int | None:
    """The first id both tokenizers know whose bytes differ (every id is compared: ~1 µs
    each)."""
    ours, theirs = target.tokenizer, draft.tokenizer
    for token in range(min(ours.vocab_size, theirs.vocab_size)):
        if ours.token_bytes(token) != theirs.token_bytes(token):
            return token
    return None
