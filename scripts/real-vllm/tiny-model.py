"""Builds the tiny random-weight Llama that real vLLM 0.32 serves in the KV-event
fixtures and benchmarks (no model hub is reachable from these machines).

    python3 scripts/real-vllm/tiny-model.py OUT_DIR [--tokenizer-from DIR]

Writes OUT_DIR/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.jinja, generation_config.json}. The tokenizer is a 4,096-entry byte-level
BPE trained on the machine's /usr/share/doc text; the one the project ships
(tests/fixtures/tiny-tokenizer/) was made by this script, and `--tokenizer-from` reuses
it so that a model built later tokenizes exactly as the fixtures were recorded.
Needs the Python packages vLLM installs (torch, transformers, tokenizers).
"""
import argparse, glob, gzip, json, os, shutil

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--tokenizer-from")
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

if a.tokenizer_from:
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(a.tokenizer_from, f), a.out)
else:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors

    def texts():
        for f in sorted(glob.glob("/usr/share/doc/**/*", recursive=True))[:4000]:
            try:
                opener = gzip.open if f.endswith(".gz") else open
                with opener(f, "rt", errors="ignore") as fh:
                    yield fh.read(20000)
            except (IsADirectoryError, OSError, EOFError):
                pass

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    with open(os.path.join(a.out, "chat_template.jinja"), "w") as fh:
        fh.write(CHAT_TEMPLATE)
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as fh:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": False, "add_eos_token": False,
            "model_max_length": 2048, "clean_up_tokenization_spaces": False,
        }, fh, indent=1)

from tokenizers import Tokenizer
vocab = Tokenizer.from_file(os.path.join(a.out, "tokenizer.json")).get_vocab_size()
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
    bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16", tie_word_embeddings=False)
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(a.out, safe_serialization=True)
with open(os.path.join(a.out, "generation_config.json"), "w") as fh:
    json.dump({"bos_token_id": 0, "eos_token_id": 1}, fh)
print("model in", a.out, "vocab", vocab)
