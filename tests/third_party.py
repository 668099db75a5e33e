"""Small models the project did not write, built from configs with random weights (nothing downloaded).

Each entry builds (model, batch): a Hugging Face transformers model whose forward computes its own
loss from `labels`, torch's own nn.Transformer inside a small language model, or a user's own nested
model of torch modules (those two take a loss from LOSSES). MODELS are the ones the tests plan;
`more()` adds the ones `bench.third_party` plans beside them.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 1000


def _tokens(batch: int, length: int, mask: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length))
    inputs = {"input_ids": ids}
    if mask:  # the second half of every sequence but the first is padding
        attention = torch.ones(batch, length, dtype=torch.long)
        attention[1:, length // 2 :] = 0
        inputs["attention_mask"] = attention
    return inputs


def gpt2():
    import transformers as hf

    config = hf.GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=256, vocab_size=VOCAB,
                           bos_token_id=0, eos_token_id=0, use_cache=False)
    batch = _tokens(4, 128)
    return hf.GPT2LMHeadModel(config), {**batch, "labels": batch["input_ids"]}


def llama():
    import transformers as hf

    config = hf.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
                            pad_token_id=0, use_cache=False)
    batch = _tokens(4, 128)
    return hf.LlamaForCausalLM(config), {**batch, "labels": batch["input_ids"]}


def bert():
    import transformers as hf

    config = hf.BertConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           vocab_size=VOCAB, num_labels=3)
    return hf.BertForSequenceClassification(config), {**_tokens(8, 128, mask=True), "labels": torch.randint(0, 3, (8,))}


def t5():
    import transformers as hf

    config = hf.T5Config(d_model=128, d_ff=512, num_layers=3, num_decoder_layers=3, num_heads=4, d_kv=32,
                         vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False)
    return hf.T5ForConditionalGeneration(config), {**_tokens(4, 128), "labels": torch.randint(2, VOCAB, (4, 64))}


def vit():
    import transformers as hf

    config = hf.ViTConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          image_size=64, patch_size=8, num_labels=10, hidden_dropout_prob=0.1)
    return hf.ViTForImageClassification(config), {"pixel_values": torch.randn(8, 3, 64, 64), "labels": torch.randint(0, 10, (8,))}


def swin():
    import transformers as hf

    config = hf.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8],
                           window_size=4, num_labels=10)
    return hf.SwinForImageClassification(config), {"pixel_values": torch.randn(8, 3, 64, 64), "labels": torch.randint(0, 10, (8,))}


def convnext():
    import transformers as hf

    config = hf.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[3, 3, 3, 3], num_labels=10, image_size=64)
    return hf.ConvNextForImageClassification(config), {"pixel_values": torch.randn(8, 3, 64, 64), "labels": torch.randint(0, 10, (8,))}


def resnet():
    import transformers as hf

    config = hf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    return hf.ResNetForImageClassification(config), {"pixel_values": torch.randn(8, 3, 64, 64), "labels": torch.randint(0, 10, (8,))}


class TransformerLM(nn.Module):
    """torch's nn.Transformer between an embedding and a head; returns logits."""

    def __init__(self, d_model: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.transformer = nn.Transformer(d_model, 4, 2, 2, 512, batch_first=True)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.embed(src), self.embed(tgt)))


def nn_transformer():
    return TransformerLM(), (torch.randint(0, VOCAB, (4, 128)), torch.randint(0, VOCAB, (4, 128)))


class Block(nn.Module):
    """A pre-norm transformer block of torch's own modules, as a user writes one."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, 4, dropout=0.1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class Stage(nn.Module):
    def __init__(self, d_model: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model) for _ in range(depth))
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class NestedLM(nn.Module):
    """A user's own language model: stages of blocks in a ModuleDict, between an embedding and a head."""

    def __init__(self, d_model: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.stages = nn.ModuleDict({"low": Stage(d_model, 2), "high": Stage(d_model, 2)})
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)


def nested():
    return NestedLM(), (torch.randint(0, VOCAB, (4, 128)),)


def _lm(cls, config, batch: int = 4, length: int = 128):
    tokens = _tokens(batch, length)
    return cls(config), {**tokens, "labels": tokens["input_ids"]}


def more():
    """Further models, which `bench.third_party` plans beside MODELS (the tests keep to MODELS)."""
    import transformers as hf

    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "vocab_size": VOCAB, "use_cache": False}
    decoder = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4}
    encdec = {"d_model": 128, "encoder_ffn_dim": 512, "decoder_ffn_dim": 512, "encoder_layers": 3, "decoder_layers": 3,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "vocab_size": VOCAB, "use_cache": False,
              "decoder_start_token_id": 2}
    images = {"pixel_values": torch.randn(8, 3, 64, 64), "labels": torch.randint(0, 10, (8,))}
    return {
        "qwen2": lambda: _lm(hf.Qwen2ForCausalLM, hf.Qwen2Config(**decoder, num_key_value_heads=2, **ids)),
        "mistral": lambda: _lm(hf.MistralForCausalLM, hf.MistralConfig(**decoder, num_key_value_heads=2, **ids)),
        "phi": lambda: _lm(hf.PhiForCausalLM, hf.PhiConfig(**{**decoder, "intermediate_size": 512}, **ids)),
        "bloom": lambda: _lm(hf.BloomForCausalLM, hf.BloomConfig(hidden_size=128, n_layer=4, n_head=4, **ids)),
        "deberta": lambda: (hf.DebertaV2ForSequenceClassification(hf.DebertaV2Config(
            hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, vocab_size=VOCAB,
            num_labels=3)), {**_tokens(8, 128, mask=True), "labels": torch.randint(0, 3, (8,))}),
        "bart": lambda: (hf.BartForConditionalGeneration(hf.BartConfig(**encdec, forced_eos_token_id=None)),
                         {**_tokens(4, 128), "labels": torch.randint(3, VOCAB, (4, 64))}),
        "whisper": lambda: (hf.WhisperForConditionalGeneration(hf.WhisperConfig(
            **encdec, num_mel_bins=40, max_source_positions=150, max_target_positions=64, pad_token_id=1)),
            {"input_features": torch.randn(4, 40, 300), "labels": torch.randint(3, VOCAB, (4, 32))}),
        "wav2vec2": lambda: (hf.Wav2Vec2ForSequenceClassification(hf.Wav2Vec2Config(  # LayerDrop 0.1 by default
            hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, conv_dim=(32, 32, 32),
            conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_labels=3, num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4)), {"input_values": torch.randn(4, 8000), "labels": torch.randint(0, 3, (4,))}),
        "clip": lambda: (hf.CLIPModel(hf.CLIPConfig(
            text_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                         "vocab_size": VOCAB, "max_position_embeddings": 64},
            vision_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                           "image_size": 64, "patch_size": 8}, projection_dim=32)),
            {"input_ids": torch.randint(0, VOCAB, (8, 32)), "pixel_values": images["pixel_values"], "return_loss": True}),
        "dinov2": lambda: (hf.Dinov2ForImageClassification(hf.Dinov2Config(
            hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=64,
            patch_size=8, num_labels=10)), images),
        "nested": nested,
    }


def lm_loss(logits: torch.Tensor) -> torch.Tensor:
    """A loss for TransformerLM's logits: predicting token ids drawn once."""
    target = torch.randint(0, VOCAB, logits.shape[:-1], generator=torch.Generator().manual_seed(0))
    return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert, "t5": t5, "vit": vit, "swin": swin, "convnext": convnext, "resnet": resnet, "nn_transformer": nn_transformer}
LOSSES = {"nn_transformer": lm_loss, "nested": lm_loss}  # the others compute their own loss from labels
