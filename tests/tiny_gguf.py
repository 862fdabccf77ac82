"""A tiny llama-architecture GGUF model, written with llama.cpp's own ``gguf`` package.

Random weights (seeded: the same bytes every time), about 530 KB: enough for the real
llama-server to load it, tokenize a chat prompt, generate and detokenize, at thousands of
tokens a second on one CPU thread. Nothing is downloaded.

The vocabulary is SentencePiece-style (``tokenizer.ggml.model = "llama"``): the control tokens,
the 256 ``<0xXX>`` byte tokens llama.cpp falls back to for a character it has no piece for,
every printable ASCII character, and some words (only generation produces those: without
their two-letter prefixes in the vocabulary, input is tokenized character by character).
The output rows of the control and byte tokens are zero, so their logits are 0 while some
random word or character always scores above it: the text generated is printable ASCII, and
a generation runs to its max_tokens instead of stopping on ``</s>`` at random.

    python3 tests/tiny_gguf.py OUT.gguf
"""
from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

EMBEDDING = 64
LAYERS = 2
HEADS = 4
FEED_FORWARD = 128
CONTEXT = 32768  # llama-server's default --ctx-size is the model's: room for long generations
SEED = 20240601

# A chat template llama-server's Jinja engine renders; the roles mark where the reply starts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WORDS = ["hello", "world", "the", "a", "model", "tiny", "proxy", "token", "stream", "llama",
         "server", "is", "ready", "and", "of", "to", "in", "it", "on", "yes", "no", "test"]

NORMAL, UNKNOWN, CONTROL, BYTE = (gguf.TokenType.NORMAL, gguf.TokenType.UNKNOWN,
                                  gguf.TokenType.CONTROL, gguf.TokenType.BYTE)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, their SentencePiece scores (higher merges first) and types."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [UNKNOWN, CONTROL, CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    # "▁" is SentencePiece's space; every other printable ASCII character as itself.
    chars = ["\u2581"] + [chr(c) for c in range(33, 127)]
    tokens += chars
    types += [NORMAL] * len(chars)
    words = [f"\u2581{w}" for w in WORDS]
    tokens += words
    types += [NORMAL] * len(words)
    scores = [0.0] * (3 + 256) + [-10.0] * len(chars) + [-1.0] * len(words)
    return tokens, scores, [int(t) for t in types]


def write_tiny_model(path: str | Path) -> Path:
    path = Path(path)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(SEED)

    def weights(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("inference-proxy tiny test model")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(EMBEDDING)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(EMBEDDING // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    # numpy shapes are ggml's reversed: token_embd is ggml {n_embd, n_vocab}.
    writer.add_tensor("token_embd.weight", weights(n_vocab, EMBEDDING, scale=1.0))
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(EMBEDDING, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", weights(EMBEDDING, EMBEDDING))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(EMBEDDING, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(FEED_FORWARD, EMBEDDING))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(FEED_FORWARD, EMBEDDING))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(EMBEDDING, FEED_FORWARD))
    writer.add_tensor("output_norm.weight", np.ones(EMBEDDING, dtype=np.float32))
    output = weights(n_vocab, EMBEDDING, scale=1.0)
    output[[i for i, t in enumerate(types) if t != NORMAL]] = 0.0  # never <unk>, </s> or a raw byte
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.gguf")
    written = write_tiny_model(sys.argv[1])
    print(f"{written} ({written.stat().st_size} bytes)")
