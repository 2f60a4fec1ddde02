"""Tiny random checkpoints with the real models' structure, built on the spot with transformers.

Used by the test fixtures and by `make demo-tiny`; nothing is downloaded. The tiny E4B keeps every
structural fact of google/gemma-4-E4B-it that the stacker must respect: 42 layers in the
[sliding×5, full]×7 pattern, 18 trailing KV-shared layers, a different head_dim for full and
sliding layers, PLE with a per-layer block, tied embeddings, vision and audio towers, bf16.
Only the widths are small.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Same structure as E4B (hidden 2560, ffn 10240, 8 heads / 2 KV, head_dim 256 / 512, PLE 256 per layer,
# vocab 262144), scaled down so a 42-layer model is ~3 MB.
TINY_E4B_TEXT = dict(
    num_hidden_layers=42, num_kv_shared_layers=18, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, hidden_size_per_layer_input=8, vocab_size=512,
    vocab_size_per_layer_input=512, sliding_window=16, max_position_embeddings=512, tie_word_embeddings=True,
)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16)
TINY_AUDIO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=64)

# Gemma-style turns; assistant content sits in {% generation %} markers so TRL can build assistant-only loss masks.
CHAT_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<end_of_turn>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<end_of_turn>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)


def save_tiny_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` tokens, with Gemma-style special tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        additional_special_tokens=specials[4:], chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(directory)


def save_tiny_gemma4(directory: Path, seed: int = 0, **text_overrides) -> Path:
    """Tiny E4B-shaped Gemma4ForConditionalGeneration, saved in bf16 with a tokenizer."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    config = Gemma4Config(text_config={**TINY_E4B_TEXT, **text_overrides}, vision_config=TINY_VISION,
                          audio_config=TINY_AUDIO)
    model = Gemma4ForConditionalGeneration(config)
    _make_every_tensor_distinct(model)
    model.to(torch.bfloat16).save_pretrained(directory)
    save_tiny_tokenizer(directory, config.text_config.vocab_size)
    return Path(directory)


def save_tiny_decoder(directory: Path, model_type: str = "llama", num_hidden_layers: int = 6, seed: int = 0) -> Path:
    """Tiny plain decoder (llama, mistral, qwen2, gemma3_text), saved in bf16 with a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    _perturb_parameters(model)
    model.to(torch.bfloat16).save_pretrained(directory)
    save_tiny_tokenizer(directory, config.vocab_size)
    return Path(directory)


def save_tiny_gemma3(directory: Path, num_hidden_layers: int = 6, seed: int = 0) -> Path:
    """Tiny Gemma3ForConditionalGeneration (text decoder + SigLIP tower), saved in bf16 with a tokenizer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                         max_position_embeddings=512),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4,
    )
    model = Gemma3ForConditionalGeneration(config)
    _perturb_parameters(model)
    model.to(torch.bfloat16).save_pretrained(directory)
    save_tiny_tokenizer(directory, config.text_config.vocab_size)
    return Path(directory)


def _perturb_parameters(model) -> None:
    """Norm weights start identical in every layer; perturb every parameter so that a tensor copied
    from the wrong layer can never pass an equality check."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)


def _make_every_tensor_distinct(model) -> None:
    """Also give each Gemma-4 layer its own layer_scalar (a buffer, all ones at init)."""
    _perturb_parameters(model)
    with torch.no_grad():
        for i, layer in enumerate(model.model.language_model.layers):
            layer.layer_scalar.fill_(1.0 + 0.01 * (i + 1))
