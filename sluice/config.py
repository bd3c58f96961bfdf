"""Engine, model, cache and scheduler settings: plain dataclasses, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sluice.spec.policy import DRAFT_ROW_COST


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling of rotary embeddings (`rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class GatedDeltaNetConfig:
    """Qwen3-Next's linear-attention layers (Gated DeltaNet)."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int


@dataclass(frozen=True)
class Mamba2Config:
    """Mamba2 mixer layers of a Mamba2 hybrid (Bamba)."""

    num_heads: int
    head_dim: int
    state_size: int
    num_groups: int
    conv_kernel: int
    chunk_size: int
    conv_bias: bool
    proj_bias: bool
    time_step_min: float  # dt is clamped to [min, max] after softplus
    time_step_max: float


@dataclass(frozen=True)
class MoEConfig:
    """Sparse mixture of experts with an optional sigmoid-gated shared expert (Qwen3-Next)."""

    num_experts: int
    num_experts_per_token: int
    expert_intermediate_size: int
    shared_expert_intermediate_size: int  # 0: no shared expert
    normalize_top_k: bool
    sparse_step: int  # every `sparse_step`-th layer is MoE...
    dense_layers: tuple[int, ...] = ()  # ...except these, which keep a dense MLP


# Layer kinds of hybrid models, as transformers' `layer_types` names them.
FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"  # Gated DeltaNet or Mamba2, per the config present


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, read from GGUF metadata or an HF config.json."""

    architecture: str  # "llama", "qwen3", "qwen3_next" or "bamba"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool = False  # Qwen3 normalises q and k per head before rotary
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0  # rotary on the first head_dim * factor dims only
    # Hybrid models: one entry per layer (FULL_ATTENTION or LINEAR_ATTENTION); () = all attention.
    layer_types: tuple[str, ...] = ()
    linear_attention: GatedDeltaNetConfig | None = None
    mamba: Mamba2Config | None = None
    moe: MoEConfig | None = None

    @property
    def is_hybrid(self) -> bool:
        """Some layers keep a fixed-size recurrent state per request instead of KV."""
        return LINEAR_ATTENTION in self.layer_types

    @property
    def num_attention_layers(self) -> int:
        """Layers that need KV pages."""
        if not self.layer_types:
            return self.num_layers
        return self.layer_types.count(FULL_ATTENTION)

    def cache_index(self, layer: int) -> int:
        """Layer `layer`'s index among the layers of its kind: attention layers index the KV
        cache, recurrent layers the state cache."""
        if not self.layer_types:
            return layer
        return self.layer_types[:layer].count(self.layer_types[layer])

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass
class CacheConfig:
    """The paged KV pool: `page_size` tokens a page, as many pages as the memory budget holds.

    Hybrid models split the budget: `state_pool_ratio` of it buys state slots (one per running
    request, the rest for prefix-cache checkpoints), the remainder KV pages for the attention
    layers.
    """

    page_size: int = 16
    memory_budget_bytes: int = 1 << 30
    dtype: str = "auto"  # of K and V: auto, float32, bfloat16, float16 (see kv_dtype)
    num_pages: int | None = None  # overrides the budget (tests force small pools with it)
    enable_prefix_cache: bool = True
    state_pool_ratio: float = 0.5
    num_state_slots: int | None = None  # overrides the ratio

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"KV cache dtype must be auto or one of {DTYPES}, got {self.dtype!r}")
        if not 0.0 < self.state_pool_ratio < 1.0:
            raise ValueError(f"state_pool_ratio must be in (0, 1), got {self.state_pool_ratio}")
        if self.num_state_slots is not None and self.num_state_slots < 1:
            raise ValueError(f"num_state_slots must be >= 1, got {self.num_state_slots}")

    def kv_dtype(self, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """auto: float16 on the CPU (as llama.cpp: half the bytes a decode step reads and the
        pool holds, same greedy output as float32 in our tests), the model's dtype elsewhere."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return torch.float16 if device.type == "cpu" else model_dtype


@dataclass
class SchedulerConfig:
    """Per-step limits: the token budget makes chunked prefill the same rule as decode."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")


SPECULATIVE_METHODS = ("ngram", "suffix", "draft")
# k where none is given: suffix decoding proposes only while its tree is confident, and on
# answers that copy long runs of the prompt a larger k pays (docs/benchmarks.md: code edit 2.4x
# at k = 8, 2.7x at k = 12, open chat unchanged).
DEFAULT_SPECULATIVE_TOKENS = {"ngram": 5, "suffix": 12, "draft": 5}
QUANTIZATIONS = ("auto", "none", "int8", "int4")  # see layers/linear.py
SELF_DRAFT = "self"  # draft_model: the target's own checkpoint, loaded at draft_quantization


@dataclass
class SpeculativeConfig:
    """Speculative decoding (sluice/spec/): a proposer guesses the next tokens of each running
    request and the target model checks them all in one step. `method` None turns it off."""

    method: str | None = None  # ngram (prompt lookup), suffix (suffix decoding) or draft (a model)
    # k: most draft tokens verified per request and step; None: DEFAULT_SPECULATIVE_TOKENS
    num_speculative_tokens: int | None = None
    ngram_min: int = 1  # n-gram: the shortest match of the context's tail that proposes
    ngram_max: int = 4  # n-gram: the longest one tried (first)
    # No proposals while more requests than this run: a large batch is bound by compute, not by
    # reading the weights, so verifying drafts costs more than it saves (docs/benchmarks.md).
    disable_batch_size: int = 8
    # draft: the model that proposes (alias, .gguf or HF folder sharing the target's vocabulary,
    # or "self": the target's checkpoint), loaded with this quantization (auto: as the target's
    # `quantization=auto` would load it; for "self", int4).
    draft_model: str | None = None
    draft_quantization: str = "auto"
    # What one draft row adds to a step, in one-row decode steps (measured: docs/benchmarks.md):
    # each request proposes only the drafts its acceptance rate pays for (spec/policy.py); 0
    # proposes `num_speculative_tokens` whatever they cost.
    draft_row_cost: float = DRAFT_ROW_COST

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative method must be one of {SPECULATIVE_METHODS}, got {self.method!r}"
            )
        if self.method == "draft" and not self.draft_model:
            raise ValueError(
                "speculative method draft needs draft_model: a model sharing the target's "
                f"vocabulary (alias, .gguf file or HF folder) or {SELF_DRAFT!r}"
            )
        if self.draft_model is not None and self.method != "draft":
            raise ValueError(
                f"draft_model is for speculative method draft, got method {self.method!r}"
            )
        if self.draft_quantization not in QUANTIZATIONS:
            raise ValueError(
                f"draft_quantization must be one of {QUANTIZATIONS}, "
                f"got {self.draft_quantization!r}"
            )
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_SPECULATIVE_TOKENS.get(self.method, 5)
        if self.num_speculative_tokens < 1:
            raise ValueError(
                f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}"
            )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(
                "n-gram sizes need 1 <= ngram_min <= ngram_max, got "
                f"{self.ngram_min} and {self.ngram_max}"
            )
        if self.disable_batch_size < 1:
            raise ValueError(f"disable_batch_size must be >= 1, got {self.disable_batch_size}")
        if self.draft_row_cost < 0:
            raise ValueError(f"draft_row_cost must be >= 0, got {self.draft_row_cost}")


@dataclass
class EngineConfig:
    model: str | None = None  # alias, .gguf path or HF folder; None: the default model
    device: str = "auto"  # auto, cpu, cuda
    dtype: str = "auto"  # auto, float32, bfloat16
    quantization: str = "auto"  # auto, none, int8, int4 (see layers/linear.py)
    max_model_len: int | None = None  # None: the model's own context length
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    compile: bool = True  # decode steps through torch.compile (engine/compiled_step.py)
    cuda_graphs: bool = True  # CUDA only: decode steps replayed from graphs (engine/cuda_graphs.py)
    sparsity: str | None = None  # a `sluice calibrate-sparsity` profile: sparse decode MLPs
    sparsity_rule: str = "auto"  # auto, threshold, predictor, topk (see sparse/decoding.py)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be auto, none, int8 or int4, got {self.quantization!r}"
            )

    @classmethod
    def create(
        cls,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str = "auto",
        max_model_len: int | None = None,
        page_size: int = 16,
        kv_cache_memory_gb: float = 2.0,
        kv_cache_dtype: str = "auto",
        num_pages: int | None = None,
        max_num_batched_tokens: int = 512,
        max_num_seqs: int = 64,
        enable_prefix_cache: bool = True,
        state_pool_ratio: float = 0.5,
        num_state_slots: int | None = None,
        threads: int | None = None,
        compile: bool = True,
        speculative_method: str | None = None,
        num_speculative_tokens: int | None = None,
        ngram_min: int = 1,
        ngram_max: int = 4,
        speculative_disable_batch_size: int = 8,
        draft_model: str | None = None,
        draft_quantization: str = "auto",
        speculative_draft_row_cost: float = DRAFT_ROW_COST,
        cuda_graphs: bool = True,
        sparsity: str | None = None,
        sparsity_rule: str = "auto",
    ) -> EngineConfig:
        """The flat keyword form used by `LLM(...)` and the command line."""
        return cls(
            model=model,
            device=device,
            dtype=dtype,
            quantization=quantization,
            max_model_len=max_model_len,
            threads=threads,
            compile=compile,
            cuda_graphs=cuda_graphs,
            sparsity=sparsity,
            sparsity_rule=sparsity_rule,
            cache=CacheConfig(
                page_size,
                int(kv_cache_memory_gb * (1 << 30)),
                kv_cache_dtype,
                num_pages,
                enable_prefix_cache,
                state_pool_ratio,
                num_state_slots,
            ),
            scheduler=SchedulerConfig(max_num_batched_tokens, max_num_seqs),
            speculative=SpeculativeConfig(
                speculative_method,
                num_speculative_tokens,
                ngram_min,
                ngram_max,
                speculative_disable_batch_size,
                draft_model,
                draft_quantization,
                speculative_draft_row_cost,
            ),
        )

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        return resolve_dtype(self.dtype, device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        accelerator = (
            torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        )
        return accelerator or torch.device("cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return DTYPES[name]
