"""Tiny GPT-2 and Llama models built from configs, with a tokenizer trained on the fly (no downloads)."""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "I would like to book a table for two at the restaurant tonight. "
    "Could you please send me the report by Friday afternoon? "
    "Thank you so much for your help with the project. "
    "We are going to the beach this weekend if the weather is nice. "
    "My favourite programming language is Python, and I write it every day. "
    "Let me know when you arrive at the station, and I will pick you up. "
    "The meeting has been moved to Tuesday morning at ten o'clock. "
    "Happy birthday! I hope you have a wonderful day with your family. "
    "Don't forget to water the plants while I'm away on holiday. "
)


def corpus_lines() -> list[str]:
    """A small, repetitive English corpus."""
    return [s.strip() + "." for s in TEXT.split(".") if s.strip()] * 20


def train_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (GPT-2 style: a word's leading space starts its token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def build_model(
    family: str,
    out: Path,
    seed: int = 0,
    layers: int = 2,
    vocab_size: int = 320,
    **llama_config: object,
) -> Path:
    """Save a small random model of `family` ("llama" or "gpt2") and its tokenizer in `out`.

    `llama_config` overrides the tiny Llama's config (benchmarks build bigger ones)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(vocab_size)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if family == "llama":
        settings = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            # larger than the default so a few LoRA steps visibly move the loss
            "initializer_range": 0.2,
            **llama_config,
        }
        config = LlamaConfig(
            vocab_size=vocab,
            num_hidden_layers=layers,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            **settings,
        )
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=128,
            initializer_range=0.2,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
