"""Text side of CLAP: tokenizer, BERT encoder, input validation; golden parity with the reference."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from m2d2_embed.config import TextConfig
from m2d2_embed.text import BertTextEncoder, Tokenizer, check_texts

PREFIX = "text_encoder.text_encoder."
TINY = TextConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)

# Edge cases of BERT's normalisation: accents, CJK, control/zero-width chars, emoji, long words,
# literal special tokens, compatibility characters, empty and whitespace-only captions.
TRICKY = [
    "Café 你好 naïve\u200b x\x00y",
    "",
    "   ",
    "ÀÉÎÕÜ ß ǅ İstanbul e\u0301",
    "tab\there\nnew\r\nline",
    "日本語のテキスト、한국어",
    "supercalifragilisticexpialidocious" * 5,
    "a" * 150,
    "\U0001f600 emoji \U0001f436!",
    "don't stop-believing...",
    "[CLS] [SEP] [MASK] [PAD] [UNK]",
    "\ufb01 ligature ½ ① \u00a0nbsp\u3000ideo",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def captions(golden) -> list[str]:
    return [str(c) for c in golden["text.captions"]]


@pytest.fixture(scope="module")
def text_state_dict(parity_state_dict) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX) :]: v for k, v in parity_state_dict.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def bert(text_state_dict) -> BertTextEncoder:
    model = BertTextEncoder(TextConfig())
    model.load_state_dict(text_state_dict, strict=True)
    return model.eval()


def _assert_close_to_golden(ours: np.ndarray, golden: np.ndarray, atol=5e-5, rtol=1.5e-5) -> float:
    assert ours.shape == golden.shape
    diff = float(np.abs(ours - golden).max())
    assert diff <= atol, diff
    assert diff / float(np.abs(golden).max()) <= rtol, diff
    return diff


# ---- tokenizer -----------------------------------------------------------------------------------


def test_token_ids_and_mask_equal_golden(tokenizer, captions, golden):
    ids, mask = tokenizer.encode(captions)
    assert ids.dtype == mask.dtype == torch.long
    np.testing.assert_array_equal(ids.numpy(), golden["text.input_ids"])
    np.testing.assert_array_equal(mask.numpy(), golden["text.attention_mask"])


def test_tokenizer_matches_transformers_bert_uncased(tokenizer):
    transformers = pytest.importorskip("transformers")
    from m2d2_embed.text import _load_vocab

    ref = transformers.BertTokenizer(vocab=_load_vocab(), do_lower_case=True)
    expected = ref(TRICKY, padding=True, return_tensors="pt")
    ids, mask = tokenizer.encode(TRICKY)
    torch.testing.assert_close(ids, expected["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(mask, expected["attention_mask"], rtol=0, atol=0)
    expected = ref(TRICKY, padding=True, truncation=True, max_length=8, return_tensors="pt")
    ids, mask = tokenizer.encode(TRICKY, max_length=8)
    torch.testing.assert_close(ids, expected["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(mask, expected["attention_mask"], rtol=0, atol=0)


def test_empty_caption_encodes_to_cls_sep(tokenizer):
    ids, mask = tokenizer.encode(["", "dog"])
    assert ids.tolist() == [[101, 102, 0], [101, 3899, 102]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_long_caption_is_truncated_with_warning(tokenizer, caplog):
    long = " ".join(["dog"] * 600)
    with caplog.at_level(logging.WARNING, logger="m2d2_embed.text"):
        ids, mask = tokenizer.encode([long, "cat", long])
    assert "2 of 3 caption(s) longer than 512 tokens were truncated" in caplog.text
    assert ids.shape == mask.shape == (3, 512)
    assert ids[0, 0] == 101 and ids[0, -1] == 102 and (ids[0, 1:-1] == 3899).all()
    assert mask[1].sum() == 3

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2d2_embed.text"):
        tokenizer.encode(["dog"] * 2)
    assert caplog.text == ""

    model = BertTextEncoder(TINY).eval()
    with torch.no_grad():
        assert model(ids, mask).shape == (3, TINY.hidden_size)


def test_encoder_rejects_more_tokens_than_positions():
    model = BertTextEncoder(TINY)
    ids = torch.ones(1, TINY.max_position + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_length"):
        model(ids, torch.ones_like(ids))


# ---- input validation ------------------------------------------------------------------------------


def test_check_texts_single_string_and_lists():
    assert check_texts("a dog") == (["a dog"], True)
    assert check_texts(["a", "b"]) == (["a", "b"], False)
    assert check_texts(("a",)) == (["a"], False)


def test_check_texts_rejects_empty_list():
    with pytest.raises(ValueError, match="at least one caption"):
        check_texts([])


def test_check_texts_rejects_non_strings_by_index():
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        check_texts(["dog", 3])
    with pytest.raises(TypeError, match=r"texts\[0\] is bytes"):
        check_texts([b"dog"])
    with pytest.raises(TypeError, match="got ndarray"):
        check_texts(np.array(["dog"]))


def test_single_string_gives_one_row(tokenizer):
    ids, mask = tokenizer.encode("a dog barks")
    assert ids.shape == mask.shape == (1, 6)  # [CLS] a dog bark ##s [SEP]
    list_ids, _ = tokenizer.encode(["a dog barks"])
    assert torch.equal(ids, list_ids)


# ---- encoder: layout and parity ------------------------------------------------------------------


def test_state_dict_keys_equal_checkpoint(bert, text_state_dict):
    assert list(bert.state_dict()) == list(text_state_dict)  # same names, same order, no position_ids
    assert len(text_state_dict) == 199


def test_text_proj_adds_top_level_linear():
    model = BertTextEncoder(TextConfig(**{**TINY.__dict__, "proj_dim": 16})).eval()
    assert {"text_proj.weight", "text_proj.bias"} <= set(model.state_dict())
    ids, mask = Tokenizer().encode(["a dog", "rain"])
    with torch.no_grad():
        assert model(ids, mask).shape == (2, 16)


def test_clap_text_embeddings_match_golden(bert, tokenizer, captions, golden):
    with torch.no_grad():
        emb = bert(*tokenizer.encode(captions)).numpy()
        single = np.concatenate([bert(*tokenizer.encode(c)).numpy() for c in captions])
    _assert_close_to_golden(emb, golden["text.emb"])
    _assert_close_to_golden(single, golden["text.emb_single"])


def test_matches_transformers_bert_model(bert, text_state_dict, tokenizer, captions):
    transformers = pytest.importorskip("transformers")
    cfg = TextConfig()
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps,
        hidden_act="gelu",
        attn_implementation="eager",
    )
    ref = transformers.BertModel(hf_cfg).eval()
    missing, unexpected = ref.load_state_dict(text_state_dict, strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids", "embeddings.token_type_ids"}
    ids, mask = tokenizer.encode(captions)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = bert.hidden_states(ids, mask)
        cls = bert(ids, mask)
    torch.testing.assert_close(cls, expected[:, 0], rtol=0, atol=1e-5)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], expected[valid], rtol=0, atol=1e-5)


# ---- mean pooling (GTE) ----------------------------------------------------------------------------


def test_mean_pooling_equals_naive_masked_mean(tokenizer):
    torch.manual_seed(0)
    model = BertTextEncoder(TextConfig(**{**TINY.__dict__, "pooling": "mean"})).eval()
    ids, mask = tokenizer.encode(["dog", "a dog barks twice, then a car passes by", ""])
    with torch.no_grad():
        pooled = model(ids, mask)
        h = model.hidden_states(ids, mask)
    naive = torch.stack([h[i, : int(mask[i].sum())].mean(0) for i in range(len(ids))])
    torch.testing.assert_close(pooled, naive, rtol=0, atol=1e-6)
    # padding does not change a caption's embedding
    with torch.no_grad():
        alone = model(*tokenizer.encode("dog"))
    torch.testing.assert_close(pooled[:1], alone, rtol=0, atol=1e-5)


def test_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match="pooling"):
        BertTextEncoder(TextConfig(**{**TINY.__dict__, "pooling": "max"}))
