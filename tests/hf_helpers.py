"""Tiny randomly initialised Hugging Face causal LMs saved to a folder, with a tokenizer
built here (character level, or a small BPE trained on the fly): nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import transformers  # the kdaudit[hf] extra, part of the dev extra: these tests need it

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. "
    "resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n"
)


def char_tokenizer(text: str = TEXT):
    """Each character one token; ids in sorted character order."""
    from tokenizers import Tokenizer, models

    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def bpe_tokenizer(text: str = TEXT, vocab_size: int = 60):
    """A byte-level-free BPE trained on `text`: other ids than the character tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["?"])
    tokenizer.train_from_iterator([text], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def save_model(folder: Path, tokenizer, kind: str = "gpt2", seed: int = 0, positions: int = 64,
               vocab_size: int | None = None) -> Path:  # fmt: skip
    """A 2-layer model of `kind` (gpt2 | llama) with random weights, and its tokenizer."""
    import torch

    vocab = vocab_size or len(tokenizer.get_vocab())
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32,
                                         n_layer=2, n_head=2, bos_token_id=None,
                                         eos_token_id=None)  # fmt: skip
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=1,
                                          max_position_embeddings=positions, bos_token_id=None,
                                          eos_token_id=None)  # fmt: skip
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # larger weights than the init's: logits far from uniform
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
