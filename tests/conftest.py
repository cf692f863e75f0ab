"""Shared fixtures: a tiny MTP transformer and a synthetic RL batch, in float64 by default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from decomp.models.tiny import ModelConfig, MTPTransformer
from decomp.objectives import RolloutBatch, model_logprobs

TINY = ModelConfig(vocab_size=11, max_len=12, d_model=16, n_layers=1, n_heads=2, d_mlp=32, mtp_depth=1)


@dataclass
class Problem:
    model: MTPTransformer
    batch: RolloutBatch

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}


def make_problem(
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    batch_size: int = 6,
    seq_len: int = 10,
    prompt_len: int = 4,
    cfg: ModelConfig = TINY,
    init_std: float = 0.3,
) -> Problem:
    """A tiny model (weights larger than default init so curvature is not negligible) and a
    batch of random sequences with ragged responses, random advantages and on-policy old
    log-probs."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MTPTransformer(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_std, generator=gen)
    model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    lengths = torch.randint(2, seq_len - prompt_len + 1, (batch_size,), generator=gen)
    pos = torch.arange(seq_len - 1)
    # aligned index j is token j+1; response tokens are positions prompt_len .. prompt_len+len-1
    mask = (pos[None, :] + 1 >= prompt_len) & (pos[None, :] + 1 < prompt_len + lengths[:, None])
    adv = torch.randn(batch_size, 1, generator=gen, dtype=dtype).expand(batch_size, seq_len - 1).clone()
    with torch.no_grad():
        params = {k: v.detach() for k, v in model.named_parameters()}
        old_logp, _, _ = model_logprobs(model, params, tokens)
    return Problem(model, RolloutBatch(tokens, mask, adv * mask, old_logp))


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """One warm-start cache for every test that trains the built-in model: the warm start of a
    configuration is trained once per test session."""
    return tmp_path_factory.mktemp("warmstart-cache")


@pytest.fixture
def problem() -> Problem:
    return make_problem()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with a character tokenizer and a chat template, saved
    locally (no downloads): the Hugging Face and TRL tests' model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
