"""A tiny randomly initialised Llama with a small byte-level BPE tokenizer, built offline in about a
second and saved to a folder so that it loads through the same `load_model(path)` as a real model;
and a two-round pipeline config on it."""

from __future__ import annotations

import json
from pathlib import Path

from cai_fast.engine.loading import CHATML


def _train_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["Please rewrite the response to remove harmful content. Critique request: identify ways"
              " the answer is unhelpful, harmful or dishonest. (A) (B) Which response is better?"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64, vocab_size: int = 400) -> Path:
    """Write a tiny random Llama + tokenizer (of `vocab_size` tokens: another size, other merges) to `path`
    and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path




TINY_PIPELINE = """out = "{out}"
model = "{model}"
rounds = 2
train_size = 3
quality = {{harmlessness = 1, helpfulness = 1}}
reward_bar = 0

[sl_cai]
rounds = 1
filter = false
batch_size = 1
few_shot = 0
answer_tokens = 5
critique_tokens = 4
revision_tokens = 5

[sft]
max_steps = 2
batch_size = 2
save_every = 1
lr = 3e-3

[label]
samples = 2
sample_tokens = 5

[judge]
principles = 1
batch_size = 4

[reward]
max_steps = 2
batch_size = 2
save_every = 1
lr = 3e-3

[ppo]
max_steps = 2
batch_size = 2
ppo_epochs = 1
max_new_tokens = 4
generation_batch = 2
save_every = 1
lr = 3e-3

[eval]
harmless_size = 2
helpful_size = 2
over_refusal_size = 2
response_tokens = 5
benchmarks = ["{data}/arith.jsonl", "{data}/yesno.json"]
benchmark_size = 3
gsm8k_tokens = 5
generation_batch = 2
human_preferences = "{data}/people.jsonl"
human_size = 2
depth_ladder = "0,2"
depth_size = 2
depth_epochs = 1
depth_tokens = 4
"""


def write_tiny_pipeline_config(tmp_path, name: str, model):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "arith.jsonl").write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"})
                                              + "\n" for a, b in [(2, 3), (10, 7), (4, 4), (1, 8)]))
    (data / "yesno.json").write_text(json.dumps({"examples": [
        {"input": "Is fire hot?", "target": "yes"}, {"input": "Is snow hot?", "target": "no"},
        {"input": "Pick the colour.\nOptions:\n(A) red\n(B) seven", "target": "(A)"}]}))
    (data / "people.jsonl").write_text("".join(json.dumps({"chosen": f"\n\nHuman: q{i}?\n\nAssistant: sure {i}",
                                                           "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no"}) + "\n"
                                               for i in range(3)))
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY_PIPELINE.format(out=tmp_path / name, model=model, data=data))
    return path
