"""Shared fixtures: a tiny randomly initialised Llama with a real (small, trained-here) BPE tokenizer, and a tiny teacher
with SmolLM2's real tokenizer (another vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout (also in CI)
SELFINSTRUCT = SHARED / "data" / "selfinstruct_user_oriented_text-davinci-003.jsonl"


def build_tiny_model(out: Path, vocab_size: int = 384, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer Llama and a byte-level BPE tokenizer trained on the built-in prompts, saved as a HF checkpoint."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from opdistill.data import builtin_prompts_path

    corpus = [json.loads(line)["prompt"] for line in builtin_prompts_path().read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def other_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer (49,152 tokens, its own chat template): a teacher of another
    tokenizer family than the tests' tiny student (384 tokens trained here)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdistill.models import load_tokenizer

    out = tmp_path_factory.mktemp("other_teacher") / "model"
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def selfinstruct() -> Path:
    assert SELFINSTRUCT.is_file(), f"the shared reference data is missing: {SELFINSTRUCT}"
    return SELFINSTRUCT


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never reach a hub: everything they load is local.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def judge_server():
    """make(**faults) -> (base URL, state): an OpenAI-compatible chat server on 127.0.0.1 (tests/openai_stub_server.py),
    a judge or an API teacher with injectable faults; every server is shut down after the test."""
    from openai_stub_server import start_server

    servers = []

    def make(**kwargs):
        server, state = start_server(**kwargs)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", state

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()
