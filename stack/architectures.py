"""What the stacker knows about each architecture, as data.

The planner and the writer never branch on a model family. Everything family-specific is one
`Architecture` row below: where the decoder layers live in the checkpoint, which config fields are
per-layer lists or per-layer dicts, which global tensors are packed per layer (Gemma-4's Per-Layer
Embeddings), and how KV sharing works.

Adding a family means adding a row and a tiny-model test, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerBlockTensor:
    """A global tensor packed as `num_hidden_layers` equal blocks along `axis`, one per layer.

    Gemma-4's PLE table `embed_tokens_per_layer.weight` is [vocab, L*256] (axis 1) and
    `per_layer_model_projection.weight` is [L*256, hidden] (axis 0). Stacking re-sequences the
    blocks: output block i is source block j for slot i's source layer j.
    """

    suffix: str  # name after the text-model prefix, e.g. "embed_tokens_per_layer.weight"
    axis: int
    block_size_field: str  # text-config field holding the block width, e.g. "hidden_size_per_layer_input"


@dataclass(frozen=True)
class KVSharing:
    """Trailing-block KV sharing, as in Gemma-4 (transformers' `kv_sharing_modes`).

    The last `count_field` layers ("reuse") compute no K/V; each reads the K/V of the last earlier
    non-shared layer of its attention type (the "store" producer). Checkpoints saved by transformers
    hold no tensors under `kv_tensor_prefixes` for reuse layers.
    """

    count_field: str = "num_kv_shared_layers"
    kv_tensor_prefixes: tuple[str, ...] = (
        "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm."
    )


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values served by this row
    text_config_key: str | None  # None: the text config is the root of config.json
    text_prefix: str  # checkpoint prefix of the text model; layers live under f"{text_prefix}layers.{i}."
    per_layer_list_fields: tuple[str, ...] = ("layer_types",)  # lists indexed by layer
    per_layer_dict_fields: tuple[str, ...] = ()  # dicts keyed by layer index (str or int)
    layer_block_tensors: tuple[LayerBlockTensor, ...] = ()
    kv_sharing: KVSharing | None = None
    last_layer_type: str | None = None  # required type of the final layer, if the family has one
    # Dry-run parameter breakdown: (label, name prefixes). First match wins; the rest is "other".
    param_groups: tuple[tuple[str, tuple[str, ...]], ...] = field(default_factory=tuple)

    @property
    def layer_prefix(self) -> str:
        return f"{self.text_prefix}layers."

    def is_kv_tensor(self, layer_suffix: str) -> bool:
        """Whether a tensor inside a decoder layer (its name after f"{layer_prefix}{i}.") holds K/V weights: what a
        KV-reuse slot drops and a grafted slot takes from its donor. The one definition; families without KV
        sharing have none. LoRA's graft group is the Linear modules among these (heal/targets.py)."""
        return self.kv_sharing is not None and layer_suffix.startswith(self.kv_sharing.kv_tensor_prefixes)


def _plain_decoder(name: str, model_types: tuple[str, ...]) -> Architecture:
    """Llama-style decoders: every layer owns its K/V, no packed per-layer tensors."""
    return Architecture(
        name=name,
        model_types=model_types,
        text_config_key=None,
        text_prefix="model.",
        param_groups=(
            ("decoder layers", ("model.layers.",)),
            ("token embeddings", ("model.embed_tokens.",)),
            ("lm head", ("lm_head.",)),
        ),
    )


_PLE_TENSORS = (
    LayerBlockTensor("embed_tokens_per_layer.weight", axis=1, block_size_field="hidden_size_per_layer_input"),
    LayerBlockTensor("per_layer_model_projection.weight", axis=0, block_size_field="hidden_size_per_layer_input"),
)


def _gemma4(name: str, model_types: tuple[str, ...], text_config_key: str | None, text_prefix: str) -> Architecture:
    return Architecture(
        name=name,
        model_types=model_types,
        text_config_key=text_config_key,
        text_prefix=text_prefix,
        per_layer_dict_fields=("per_layer_config",),
        layer_block_tensors=_PLE_TENSORS,
        kv_sharing=KVSharing(),
        last_layer_type="full_attention",
        param_groups=(
            ("decoder layers", (f"{text_prefix}layers.",)),
            ("PLE table", (f"{text_prefix}embed_tokens_per_layer.",)),
            ("token embeddings", (f"{text_prefix}embed_tokens.",)),
            ("PLE projection",
             (f"{text_prefix}per_layer_model_projection.", f"{text_prefix}per_layer_projection_norm.")),
            ("vision/audio towers",
             ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")),
        ),
    )


ARCHITECTURES: tuple[Architecture, ...] = (
    _gemma4("gemma4", ("gemma4",), "text_config", "model.language_model."),
    _gemma4("gemma4_text", ("gemma4_text",), None, "model."),
    Architecture(
        name="gemma3",
        model_types=("gemma3",),
        text_config_key="text_config",
        text_prefix="language_model.model.",  # the names Gemma-3 checkpoints (and save_pretrained) use
        param_groups=(
            ("decoder layers", ("language_model.model.layers.",)),
            ("token embeddings", ("language_model.model.embed_tokens.",)),
            ("vision tower", ("vision_tower.", "multi_modal_projector.")),
        ),
    ),
    _plain_decoder("llama-style", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")),
)


class UnsupportedArchitectureError(ValueError):
    pass


def architecture_for(model_type: str | None, model_name: str) -> Architecture:
    """The row serving `model_type`, or an error listing what is supported."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    supported = sorted(t for arch in ARCHITECTURES for t in arch.model_types)
    raise UnsupportedArchitectureError(
        f"model {model_name!r} has model_type {model_type!r}, which the stacker does not support. "
        f"Supported model_types: {', '.join(supported)}. To add one, add a row to stack/architectures.py "
        "and a tiny-model test."
    )


def architecture_named(name: str) -> Architecture:
    """The row called `name` (as recorded in stack.json's "architecture")."""
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise UnsupportedArchitectureError(f"unknown architecture {name!r}; known: {[a.name for a in ARCHITECTURES]}")
