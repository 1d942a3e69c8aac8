"""Tiny random models and real-format PEFT adapters made on the fly, for the mechanics tests."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

torch.set_num_threads(2)


def _save_base(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


WORDS = [f"w{i}" for i in range(100)]


def _save_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A WordPiece tokenizer over the words w0..w99, so text evaluators run on the tiny BERT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = (specials + WORDS)[:vocab_size]
    # built from the tokenizers library: transformers 5 ignores a bare vocab_file here, and every word
    # would read as [UNK]
    words = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tokenizer = BertTokenizerFast(
        tokenizer_object=words,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(folder)
    loaded = BertTokenizerFast.from_pretrained(folder)
    assert loaded("w3 w50")["input_ids"] == [2, 8, 55, 3], "the test tokenizer must know its words"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
    )
    folder = _save_base(BertForSequenceClassification(config), tmp_path_factory.mktemp("tiny-bert"))
    _save_word_tokenizer(folder, config.vocab_size)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return _save_base(LlamaForCausalLM(config), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return _save_base(GPT2LMHeadModel(config), tmp_path_factory.mktemp("tiny-gpt2"))


def load_base(base: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if "bert" in base.name:
        return AutoModelForSequenceClassification.from_pretrained(base).eval()
    return AutoModelForCausalLM.from_pretrained(base).eval()


def make_lora(
    base: Path,
    out: Path,
    seed: int,
    r: int = 4,
    alpha: float = 8,
    targets: tuple[str, ...] = ("query", "value"),
    **config: object,
) -> Path:
    """A real PEFT folder whose lora_A, lora_B and heads are random (as if trained)."""
    model = load_base(base)
    task_type = "SEQ_CLS" if "bert" in base.name else "CAUSAL_LM"
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type=task_type, **config)
    )
    randomize_trainable(peft_model, seed, 0.2)
    peft_model.save_pretrained(out)
    return out


def randomize_trainable(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Fill a PEFT model's trainable tensors (LoRA factors, heads) with seeded noise, as if trained."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def ids_for(base: Path) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    return torch.randint(3, 90, (4, 12), generator=generator)


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids_for(base)).logits


@pytest.fixture
def bert_zoo(tiny_bert: Path, tmp_path: Path) -> list[Path]:
    """Five adapters of mixed ranks, alphas, targets, rsLoRA and patterns on the tiny BERT."""
    zoo = tmp_path / "zoo"
    specs = [
        dict(r=4, alpha=8),
        dict(r=2, alpha=16, use_rslora=True),
        dict(r=8, alpha=8, targets=("query", "key", "value")),
        dict(
            r=4,
            alpha=4,
            rank_pattern={"bert.encoder.layer.1.attention.self.value": 2},
            alpha_pattern={"query": 32},
        ),
        dict(r=3, alpha=6, targets=("value",)),
    ]
    return [make_lora(tiny_bert, zoo / f"task{i}", seed=i, **spec) for i, spec in enumerate(specs)]


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
