"""Tiny random Hugging Face models (nothing downloaded) of the six families fxprune's
export front end is proven on, with the keyword inputs they are called with.

Their weights are of unit scale (helpers.unit_scale), not Hugging Face's std-0.02
initialisation, under which a query/key slicing error moves the output by less than the
oracle's tolerance (tests/test_attention_heads.py shows one head now matters)."""
from __future__ import annotations

import torch

from helpers import unit_scale

IDS_SHAPE = (2, 8)


def tiny_models() -> dict[str, tuple[torch.nn.Module, dict, int]]:
    """name -> (model in eval mode, keyword inputs, MLP width)."""
    import transformers as tf

    torch.manual_seed(0)
    ids = torch.randint(0, 100, IDS_SHAPE, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(IDS_SHAPE, dtype=torch.long)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    causal = dict(vocab_size=100, max_position_embeddings=64, use_cache=False, num_key_value_heads=2, **small)
    models = {
        "bert": (tf.BertModel(tf.BertConfig(vocab_size=100, max_position_embeddings=64, **small)),
                 {"input_ids": ids, "attention_mask": mask}, 64),
        "gpt2": (tf.GPT2Model(tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            use_cache=False, bos_token_id=0, eos_token_id=0)),
                 {"input_ids": ids}, 128),
        "llama": (tf.LlamaForCausalLM(tf.LlamaConfig(**causal)), {"input_ids": ids}, 64),
        "qwen2": (tf.Qwen2ForCausalLM(tf.Qwen2Config(**causal)), {"input_ids": ids}, 64),
        "vit": (tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **small)),
                {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}, 64),
        "t5": (tf.T5EncoderModel(tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_heads=4)), {"input_ids": ids}, 64),
    }
    return {name: (unit_scale(model, seed).eval(), inputs, width)
            for seed, (name, (model, inputs, width)) in enumerate(models.items())}
