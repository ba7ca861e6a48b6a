"""Text side of CLAP: a BERT encoder in plain torch and a WordPiece tokenizer.

``BertTextEncoder`` has the module names of Hugging Face ``BertModel``, so the checkpoint's
``text_encoder.text_encoder.*`` tensors load into it one-to-one (strictly) once the prefix is stripped.
``Tokenizer`` reproduces ``BertTokenizerFast('bert-base-uncased')`` with the vocabulary shipped in
``m2d2_embed/assets``. ``transformers`` is not needed for either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib.resources import files

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig

logger = logging.getLogger(__name__)

VOCAB_FILE = "bert-base-uncased-vocab.txt"  # in m2d2_embed/assets; Apache-2.0, from google-research/bert
PAD_ID = 0  # [PAD] in the bert-base-uncased vocabulary


# ------------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------------


def check_texts(texts: str | Sequence[str]) -> tuple[list[str], bool]:
    """Validate captions: one ``str`` or a non-empty list/tuple of ``str``.

    Returns ``(captions, single)`` where ``single`` is True when one bare string was given (callers then
    return one row without the batch dimension, or a batch of 1, as they document).
    Raises ``TypeError`` for other types or non-string items, ``ValueError`` for an empty list.
    """
    if isinstance(texts, str):
        return [texts], True
    if not isinstance(texts, (list, tuple)):
        raise TypeError(
            f"texts must be a str or a list/tuple of str, got {type(texts).__name__}; "
            "wrap a single caption as [caption] or pass it as a plain string"
        )
    if len(texts) == 0:
        raise ValueError("texts is an empty list; pass at least one caption")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(
                f"texts[{i}] is {type(t).__name__}, not str; every caption must be a string "
                "(convert with str() or drop the item)"
            )
    return list(texts), False


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def _load_vocab() -> dict[str, int]:
    text = files(__package__).joinpath("assets").joinpath(VOCAB_FILE).read_text(encoding="utf-8")
    return {tok: i for i, tok in enumerate(text.splitlines())}


class Tokenizer:
    """BERT uncased WordPiece tokenizer (the ``tokenizers`` library, same rules as ``BertTokenizerFast``).

    Normalisation: control characters removed, whitespace unified, spaces around CJK ideographs,
    lower-casing and accent stripping (NFD, marks dropped). Pre-tokenisation splits on whitespace and
    punctuation; words are split into WordPieces (unknown words -> ``[UNK]``). Each caption becomes
    ``[CLS] tokens [SEP]``; an empty (or whitespace-only) caption becomes ``[CLS] [SEP]``.
    ``vocab`` maps token -> id; the default is the shipped bert-base-uncased vocabulary (30522 entries).
    """

    def __init__(self, vocab: dict[str, int] | None = None) -> None:
        from tokenizers.implementations import BertWordPieceTokenizer

        vocab = _load_vocab() if vocab is None else vocab
        self._tok = BertWordPieceTokenizer(
            vocab, clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )  # strip_accents=None follows lowercase, as in BERT
        self.pad_id = vocab["[PAD]"]
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, texts: str | Sequence[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, padded with ``[PAD]`` (0) to the longest caption of the batch.

        Captions longer than ``max_length`` tokens (``[CLS]`` and ``[SEP]`` included) are cut to
        ``max_length`` keeping ``[CLS] ... [SEP]``, with a warning; BERT has 512 positions.
        Returns ``(input_ids, attention_mask)``, both ``LongTensor [N, L]``, mask 1 on tokens, 0 on padding.
        """
        texts, _ = check_texts(texts)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        ids = [e.ids for e in self._tok.encode_batch(texts)]
        long = [i for i, x in enumerate(ids) if len(x) > max_length]
        if long:
            logger.warning(
                "%d of %d caption(s) longer than %d tokens were truncated (indices %s); "
                "shorten them to keep their ends",
                len(long),
                len(ids),
                max_length,
                long[:10] if len(long) <= 10 else f"{long[:10]}...",
            )
            for i in long:
                ids[i] = ids[i][: max_length - 1] + [self.sep_id]
        n, length = len(ids), max(len(x) for x in ids)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention_mask[i, : len(x)] = 1
        return input_ids, attention_mask

    __call__ = encode


# ------------------------------------------------------------------------------------------------
# BERT encoder (module names = Hugging Face BertModel state-dict keys)
# ------------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"{L} tokens exceed the {self.position_embeddings.num_embeddings} positions of the text "
                "encoder; tokenize with max_length to truncate"
            )
        pos = torch.arange(L, device=input_ids.device)  # no position_ids buffer (not in the checkpoint)
        # token type 0 everywhere (single sentences)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(pos)
        return self.LayerNorm(x)  # (N, L, D)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.n_head = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        q, k, v = (
            m(x).view(N, L, self.n_head, D // self.n_head).transpose(1, 2) for m in (self.query, self.key, self.value)
        )  # (N, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (N, 1, 1, L), additive
        return y.transpose(1, 2).reshape(N, L, D)


class BertSelfOutput(nn.Module):  # also the FFN output ("output"): dense, dropout (none here), residual, LN
    def __init__(self, cfg: TextConfig, d_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)  # post-norm, as BERT


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, not tanh


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    """Kept so that checkpoints load strictly; CLAP does not use it."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BertTextEncoder(nn.Module):
    """BERT text encoder returning one embedding per caption.

    State-dict keys are those of Hugging Face ``BertModel`` (``embeddings.*``, ``encoder.layer.N.*``,
    ``pooler.*``), plus ``text_proj.weight``/``text_proj.bias`` when ``config.proj_dim`` is set.
    Pooling over the last hidden state: ``'cls'`` takes the ``[CLS]`` token (M2D2 2025, BERT),
    ``'mean'`` averages the tokens where ``attention_mask`` is 1 (GTE, M2D-CLAP 2024).
    Dropout is absent: this is inference code, and outputs equal ``BertModel`` in eval mode.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        if config.pooling not in ("cls", "mean"):
            raise ValueError(f"unknown text pooling {config.pooling!r}; use 'cls' or 'mean'")
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.text_proj = nn.Linear(config.hidden_size, config.proj_dim) if config.proj_dim else None

    @property
    def out_dim(self) -> int:
        return self.config.proj_dim or self.config.hidden_size

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state ``[N, L, hidden]`` (``BertModel(...).last_hidden_state``)."""
        x = self.embeddings(input_ids)  # (N, L, D)
        # additive mask, 0 on tokens and a large negative value on padding: (N, 1, 1, L).
        # Unlike a boolean mask, an all-padding row cannot turn into NaN.
        keep = attention_mask[:, None, None, :].to(torch.bool)
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        return self.encoder(x, mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids`` and ``attention_mask`` ``[N, L]`` (from ``Tokenizer.encode``) -> ``[N, out_dim]``,
        not normalized."""
        h = self.hidden_states(input_ids, attention_mask)  # (N, L, D)
        if self.config.pooling == "cls":
            e = h[:, 0]  # (N, D)
        else:
            m = attention_mask.to(h.dtype).unsqueeze(-1)  # (N, L, 1)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # (N, D)
        return self.text_proj(e) if self.text_proj is not None else e
