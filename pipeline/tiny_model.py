"""The shipped default model: a tiny Llama-style causal LM and a BPE tokenizer trained here, offline.

No model hub is reachable on our machines, so the default run and the tests build their model locally and
save it with ``save_pretrained``. Everything downstream loads it with ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(path)``, exactly as it would load a real checkpoint.

    python -m pipeline.tiny_model models/tiny-llama          # what the first stage does when it is missing
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.artifacts import atomic_dir
from pipeline.config import REPO_ROOT

DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "tiny-llama"
DEFAULT_CORPUS = (REPO_ROOT / "data" / "preference" / "train.jsonl",)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
# A minimal ChatML-like template; it ends every message with EOS, so the tokenizer's chat rendering, not the
# tokenize stage, supplies the completion's EOS for conversational data.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _corpus_lines(files) -> list[str]:
    lines: list[str] = []
    for file in files:
        for raw in Path(file).read_text().splitlines():
            row = json.loads(raw)
            lines.extend(str(row[key]) for key in ("prompt", "chosen", "rejected") if key in row)
    return lines


def build_tokenizer(corpus_files=DEFAULT_CORPUS, vocab_size: int = 512):
    """Byte-level BPE trained on the shipped text: any string tokenizes, no unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(corpus_files), trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL_TOKENS["bos_token"])
    # Like Llama's tokenizer, prepend BOS to every encoded text (completions are encoded without it).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | Path = DEFAULT_MODEL_DIR,
    *,
    corpus_files=DEFAULT_CORPUS,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
) -> Path:
    """Build tokenizer + randomly initialised Llama and save both to ``out_dir`` (atomically, as a directory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus_files, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out_dir


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL_DIR))
