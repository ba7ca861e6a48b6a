"""Caption (sentence) embeddings for stage 1, computed offline as upstream M2D-CLAP does.

Upstream (``clap/Note-*_GTEbase.ipynb``) runs ``thenlper/gte-base`` through ``transformers.AutoModel`` with
``max_length=512`` and averages the last hidden state over the attention mask, without normalising. The
default here is the same; ``backend="sentence-transformers"`` uses that library's own pooling instead.

Output: a float32 ``.npy`` [N, K, E] aligned with the CSV rows (K = most captions of a row, NaN-padded), the
format ``data.captions`` reads. The work is done in batches into ``OUT.partial.npy`` with a progress file, so
an interrupted run continues where it stopped; the finished array is renamed onto ``OUT`` at the end.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .data import Row, read_csv

log = logging.getLogger(__name__)

Embedder = Callable[[list[str]], np.ndarray]  # captions -> [n, E] float32


def load_embedder(
    spec: str,
    backend: str = "transformers",
    device: str = "cpu",
    max_length: int = 512,
    pooling: str = "mean",
) -> tuple[Embedder, str]:
    """A sentence embedder from ``spec`` (``hf://<repo>`` or a local model folder) and a description of it.

    Args:
        backend: "transformers" (``AutoTokenizer`` + ``AutoModel``, as upstream) or "sentence-transformers".
        pooling: "mean" over the attention mask (upstream's, GTE's) or "cls" (transformers backend only).
        max_length: tokens per caption (longer ones are cut).
    """
    name = spec[len("hf://") :] if spec.startswith("hf://") else spec
    if backend == "sentence-transformers":
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(
                "backend 'sentence-transformers' needs the sentence-transformers package: "
                "pip install 'm2d2_embed[captions]' sentence-transformers"
            ) from e
        st = SentenceTransformer(name, device=device)
        st.max_seq_length = max_length

        def embed_st(texts: list[str]) -> np.ndarray:
            return np.asarray(st.encode(texts, batch_size=len(texts), convert_to_numpy=True), dtype=np.float32)

        return embed_st, f"sentence-transformers:{name}"
    if backend != "transformers":
        raise ValueError(f"backend must be 'transformers' or 'sentence-transformers', got {backend!r}")
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError("computing caption embeddings needs transformers: pip install 'm2d2_embed[captions]'") from e
    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModel.from_pretrained(name).to(device).eval()

    @torch.no_grad()
    def embed_hf(texts: list[str]) -> np.ndarray:
        b = tok(texts, max_length=max_length, padding=True, truncation=True, return_tensors="pt").to(device)
        h = model(**b).last_hidden_state  # (n, L, E)
        if pooling == "cls":
            e = h[:, 0]
        else:
            m = b["attention_mask"][..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1)
        return e.float().cpu().numpy()

    return embed_hf, f"transformers:{name}:{pooling}:{max_length}"


def caption_embeddings(
    rows: Sequence[Row],
    embed: Embedder,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    description: str = "",
    progress: bool = True,
    stop_after: int | None = None,
) -> Path | None:
    """Embed every caption of ``rows`` with ``embed`` into ``out`` ([N, K, E] float32, NaN-padded).

    Resumable: the partial array and ``OUT.progress.json`` (captions done, row count, embedder) are written after
    every batch; a new call with the same rows and ``description`` continues from there. ``stop_after`` stops
    after that many batches (as an interruption would) and returns None; otherwise returns ``out``.
    """
    out = Path(out)
    caps = [(i, k, c) for i, r in enumerate(rows) for k, c in enumerate(r.captions)]
    if not caps:
        raise ValueError("no row has a caption; the CSV needs a 'caption' column (several separated by '|')")
    K = max(len(r.captions) for r in rows)
    partial = out.with_name(out.name + ".partial.npy")
    state_file = out.with_name(out.name + ".progress.json")
    done, arr = 0, None
    if partial.exists() and state_file.exists():
        st = json.loads(state_file.read_text())
        if st.get("rows") == len(rows) and st.get("captions") == len(caps) and st.get("embedder") == description:
            arr = np.lib.format.open_memmap(partial, mode="r+")
            done = int(st["done"])
            log.info("resuming %s at caption %d of %d", out, done, len(caps))
        else:
            log.warning("%s belongs to another run (%s); starting over", partial, st)
    it = range(done, len(caps), batch_size)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(caps), initial=done, unit="caption", desc=out.name)
        except ImportError:
            bar = None
    for n_batches, start in enumerate(it):
        if stop_after is not None and n_batches >= stop_after:
            if bar is not None:
                bar.close()
            return None
        chunk = caps[start : start + batch_size]
        e = np.asarray(embed([c for _, _, c in chunk]), dtype=np.float32)
        if e.ndim != 2 or len(e) != len(chunk):
            raise ValueError(f"the embedder returned {e.shape} for {len(chunk)} captions; expected [n, E]")
        if arr is None:
            out.parent.mkdir(parents=True, exist_ok=True)
            arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(rows), K, e.shape[1]))
            arr[:] = np.nan
        for (i, k, _), v in zip(chunk, e, strict=True):
            arr[i, k] = v
        arr.flush()
        done = start + len(chunk)
        tmp = state_file.with_name(state_file.name + ".tmp")
        tmp.write_text(json.dumps({"done": done, "rows": len(rows), "captions": len(caps), "embedder": description}))
        os.replace(tmp, state_file)
        if bar is not None:
            bar.update(len(chunk))
        elif done % (batch_size * 50) < batch_size:
            log.info("%d of %d captions embedded", done, len(caps))
    if bar is not None:
        bar.close()
    del arr
    os.replace(partial, out)
    state_file.unlink(missing_ok=True)
    log.info("wrote %s: %d clips x %d captions x %d dims", out, len(rows), K, np.load(out, mmap_mode="r").shape[-1])
    return out


def captions_csv(
    csv: str | os.PathLike,
    embedder: str,
    out: str | os.PathLike,
    *,
    backend: str = "transformers",
    device: str = "cpu",
    batch_size: int = 64,
    max_length: int = 512,
    pooling: str = "mean",
    root: str | None = None,
) -> Path | None:
    """``caption_embeddings`` for the rows of a CSV with a ``caption`` column, with ``load_embedder(embedder)``."""
    rows = read_csv(csv, root)
    embed, desc = load_embedder(embedder, backend, device, max_length, pooling)
    return caption_embeddings(rows, embed, out, batch_size=batch_size, description=desc)
