"""M2D2: the public model. Chunking, batching, pooling and output shaping around the encoder and heads."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .audio import AudioInput, LogMelSpectrogram, prepare_audio
from .config import ModelConfig
from .encoder import AudioEncoder
from .heads import build_audio_head

log = logging.getLogger(__name__)

FULL_ATTENTION_MAX_SECONDS = 300.0  # long_audio="auto": the CLAP head attends over the whole clip up to this
DEFAULT_TEMPLATE = "{label} can be heard"  # the upstream zero-shot evaluation prompt


class M2D2(nn.Module):
    """An M2D / M2D-CLAP / M2D2 model: log-mel front end, ViT audio encoder, optional CLAP heads.

    Build it with :func:`m2d2_embed.load`. Embedding methods take audio as a float tensor or numpy array
    ([samples] or [batch, samples], any sample rate given by ``sample_rate=``), a list of 1-D arrays of
    different lengths, or file path(s). Outputs follow the input: tensors in -> tensors on the model's device,
    numpy or paths in -> numpy; a 1-D input gives outputs without the batch axis. Outputs are float32.
    """

    _compiled = False  # set by load(compile=True): full chunks run through the compiled encoder

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        with torch.device("cpu"):  # the front end has no weights; build it for real even under a meta context
            self.frontend = LogMelSpectrogram(config.frontend)
        self.encoder = AudioEncoder(config.encoder)
        self.audio_proj = build_audio_head(config.audio_head) if config.audio_head else None
        self.text_encoder = None
        if config.text is not None:
            from .text import BertTextEncoder

            self.text_encoder = BertTextEncoder(config.text)
        self._tokenizer = None
        self.eval()

    # -- basic properties ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def sample_rate(self) -> int:
        """The model's sample rate in Hz (inputs at other rates are resampled)."""
        return self.config.frontend.sample_rate

    @property
    def device(self) -> torch.device:
        return self.encoder.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.pos_embed.dtype

    @property
    def embed_dim(self) -> int:
        """Width of one patch token (768)."""
        return self.config.encoder.embed_dim

    @property
    def freq_patches(self) -> int:
        """Frequency patches per time step (5 for 80 mel bins and 16x16 patches)."""
        return self.config.encoder.grid[0]

    @property
    def frame_dim(self) -> int:
        """Width of a stacked frame embedding (5 x 768 = 3840)."""
        return self.freq_patches * self.embed_dim

    @property
    def frame_hop_seconds(self) -> float:
        """Time between frame embeddings inside a chunk: one patch width of log-mel hops (0.16 s)."""
        c = self.config
        return c.encoder.patch_size[1] * c.frontend.hop_length / c.frontend.sample_rate

    def extra_repr(self) -> str:
        return f"name={self.name!r}, sample_rate={self.sample_rate}"

    # -- chunk geometry --------------------------------------------------------------------------------------
    def _chunk_plan(self, num_frames: int) -> list[tuple[int, int]]:
        """(first log-mel frame, time patches) of each chunk of a clip with ``num_frames`` frames.

        Chunks are consecutive and non-overlapping, ``U`` (training width) frames each. The last, shorter chunk
        is zero-padded (in the normalised domain) to whole patches, as in the reference. A chunk never has more
        time patches than the position embedding: frames past them are ignored, as for a full chunk (the
        reference crashes on a last chunk of U - 8 .. U - 1 frames).
        """
        U = self.config.encoder.chunk_frames
        pw = self.config.encoder.patch_size[1]
        T = self.config.encoder.grid[1]
        plan = []
        for start in range(0, num_frames, U):
            width = min(U, num_frames - start)
            plan.append((start, min(T, math.ceil(width / pw))))
        return plan

    def num_frames_for(self, num_samples: int) -> int:
        """Number of frame embeddings for ``num_samples`` at the model's rate."""
        return sum(t for _, t in self._chunk_plan(self.frontend.num_frames(num_samples)))

    def frame_timestamps(self, num_samples: int, sample_rate: int | None = None,
                         align: str = "center") -> np.ndarray:
        """Times of the frame embeddings of a clip, in seconds, float64 [T].

        Args:
            num_samples: length of the clip in samples at ``sample_rate``.
            sample_rate: rate of ``num_samples`` (default: the model's rate).
            align: ``"center"`` (default): the centre of the log-mel frames each embedding covers (a 16-frame
                patch is 0.16 s; chunk boundaries are respected). ``"reference"``: the upstream runtime's
                ``i * duration / T``, which spreads the steps evenly over the clip (for HEAR compatibility).
        """
        if int(num_samples) <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        sr = sample_rate or self.sample_rate
        n = int(num_samples) if sr == self.sample_rate else round(int(num_samples) * self.sample_rate / sr)
        plan = self._chunk_plan(self.frontend.num_frames(n))
        if align == "reference":
            T = sum(t for _, t in plan)
            return np.arange(T, dtype=np.float64) * (int(num_samples) / sr) / T
        if align != "center":
            raise ValueError(f"align must be 'center' or 'reference', got {align!r}")
        pw = self.config.encoder.patch_size[1]
        hop_s = self.config.frontend.hop_length / self.sample_rate
        centres = [start + j * pw + (pw - 1) / 2 for start, t in plan for j in range(t)]
        return np.asarray(centres, dtype=np.float64) * hop_s  # centred STFT: frame k is centred at k * hop

    # -- core: waveforms -> patch tokens ---------------------------------------------------------------------
    def _max_batch(self, batch_size: int | None) -> int:
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            return batch_size
        return 256 if self.device.type == "cuda" else 32

    def _encode_groups(self, waves: list[torch.Tensor],
                       batch_size: int | None = None) -> list[tuple[list[int], torch.Tensor]]:
        """Patch tokens of clips grouped by length: ``[(indices into waves, tokens [b, f, T, D] float32)]``."""
        by_len: dict[int, list[int]] = {}
        for i, w in enumerate(waves):
            by_len.setdefault(w.shape[-1], []).append(i)
        idx = list(by_len.values())
        stacked = [waves[g[0]][None] if len(g) == 1 else torch.stack([waves[i] for i in g]) for g in idx]
        return list(zip(idx, self._encode_stacked(stacked, batch_size)))

    @torch.inference_mode()
    def _encode_stacked(self, groups: Sequence[torch.Tensor], batch_size: int | None = None) -> list[torch.Tensor]:
        """Patch tokens of groups of equal-length clips: waveforms [b, N] (N may differ between groups; any
        device, pinned host memory is copied without blocking) -> tokens [b, f, T, D] float32 per group.

        Clips of one group share one front-end call; chunks of one width from all groups run through the encoder
        together, at most ``batch_size`` per pass. Work per batch is vectorised: nothing loops over clips.
        """
        pw = self.config.encoder.patch_size[1]
        f = self.freq_patches
        n_chunks: list[int] = []
        jobs: dict[int, list[tuple[int, int, torch.Tensor]]] = {}  # time patches -> [(group, chunk, lms slice)]
        for g, x in enumerate(groups):
            x = x.to(self.device, torch.float32, non_blocking=True)
            lms = self.frontend(x)  # (b, 1, n_mels, F)
            plan = self._chunk_plan(lms.shape[-1])
            n_chunks.append(len(plan))
            for c, (start, t) in enumerate(plan):
                chunk = lms[..., start:start + t * pw]
                if chunk.shape[-1] < t * pw:  # pad with 0 in the normalised domain, as the reference does
                    chunk = nn.functional.pad(chunk, (0, t * pw - chunk.shape[-1]))
                jobs.setdefault(t, []).append((g, c, chunk))
        results: dict[tuple[int, int], torch.Tensor] = {}
        max_b = self._max_batch(batch_size)
        for t, items in jobs.items():
            batch = torch.cat([ch for _, _, ch in items]) if len(items) > 1 else items[0][2]  # (n, 1, n_mels, w)
            tokens = self._run_encoder(batch, max_b).reshape(-1, f, t, self.embed_dim)  # (n, f, t, D)
            for (g, c, _), part in zip(items, tokens.split([ch.shape[0] for _, _, ch in items])):
                results[(g, c)] = part
        out = []
        for g, n in enumerate(n_chunks):
            parts = [results[(g, c)] for c in range(n)]
            out.append(parts[0] if n == 1 else torch.cat(parts, dim=2))  # chunks joined in time
        return out

    def _encode_tokens(self, waves: list[torch.Tensor], batch_size: int | None = None) -> list[torch.Tensor]:
        """Patch tokens of each clip, [f, T, D] float32 (frequency, time, width), chunks joined in time."""
        out: list[torch.Tensor | None] = [None] * len(waves)
        for idx, tok in self._encode_groups(waves, batch_size):
            for j, i in enumerate(idx):
                out[i] = tok[j]
        return out  # type: ignore[return-value]

    def _map_clips(self, waves: list[torch.Tensor], fn, batch_size: int | None) -> torch.Tensor | list[torch.Tensor]:
        """Encode clips group by group and apply ``fn(tokens [b, f, T, D], num_samples) -> [b, ...]`` to each
        group of equal-length clips; returns the results in input order: one tensor [n, ...] when every clip's
        result has the same shape, else a list of per-clip tensors.

        Clips are taken in order of length and at most four encoder batches of chunks (or one clip) are encoded at
        a time, so 10,000 clips or an hour-long file never hold all their tokens at once.
        """
        budget = 4 * self._max_batch(batch_size)
        pieces: list[tuple[list[int], torch.Tensor]] = []  # (input indices, fn's results for them)

        def flush(group: list[int]) -> None:
            for idx, tok in self._encode_groups([waves[j] for j in group], batch_size):
                pieces.append(([group[j] for j in idx], fn(tok, waves[group[idx[0]]].shape[-1])))

        n_chunks: dict[int, int] = {}  # chunks per clip length, computed once per distinct length
        group: list[int] = []
        n = 0
        for i in sorted(range(len(waves)), key=lambda i: waves[i].shape[-1]):
            L = waves[i].shape[-1]
            if L not in n_chunks:
                n_chunks[L] = len(self._chunk_plan(self.frontend.num_frames(L)))
            c = n_chunks[L]
            if group and n + c > budget:
                flush(group)
                group, n = [], 0
            group.append(i)
            n += c
        if group:
            flush(group)
        order = [i for idx, _ in pieces for i in idx]
        if len({tuple(r.shape[1:]) for _, r in pieces}) == 1:  # one tensor, put in input order with one scatter
            cat = torch.cat([r for _, r in pieces]) if len(pieces) > 1 else pieces[0][1]
            if order == list(range(len(order))):
                return cat
            out = torch.empty_like(cat)
            out[torch.tensor(order, device=cat.device)] = cat
            return out
        per_clip: list[Any] = [None] * len(waves)
        for i, r in zip(order, (r for _, rs in pieces for r in rs)):
            per_clip[i] = r
        return per_clip

    def _run_encoder(self, batch: torch.Tensor, max_b: int) -> torch.Tensor:
        """Encoder over chunks of one width: [n, 1, n_mels, w] -> [n, f*t, D] float32, at most ``max_b`` per pass.

        On CUDA out-of-memory the micro-batch is halved and retried. With a compiled encoder, full-width chunks
        go through the compiled graph in micro-batches zero-padded to a bucket size (few shapes, no recompiles;
        rows are independent, so the padding does not change the real rows); other widths run eagerly.
        """
        T = self.config.encoder.grid[1]
        compiled = self._compiled and batch.shape[-1] == T * self.config.encoder.patch_size[1]
        encode = self.encoder if compiled or not self._compiled else self.encoder.forward  # forward: eager
        outs, i = [], 0
        while i < batch.shape[0]:
            x = batch[i:i + max_b].to(self.dtype)
            n = x.shape[0]
            if compiled:
                n, size = _bucket(n, max_b, 16 if x.is_cuda else None)  # CPU: unpadded, n may shrink
                # contiguous: a chunk sliced from a longer log-mel has other strides, which would recompile
                x = x[:n].contiguous() if size == n else torch.cat([x[:n], x.new_zeros(size - n, *x.shape[1:])])
            try:
                outs.append(encode(x)[:n].float())
            except torch.cuda.OutOfMemoryError:
                if max_b == 1:
                    raise
                max_b = max(1, max_b // 2)
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory; retrying with batches of %d chunks", max_b)
                continue
            i += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    # -- output shaping -----------------------------------------------------------------------------------------
    @staticmethod
    def _out(x: torch.Tensor, kind: str) -> torch.Tensor | np.ndarray:
        return x if kind == "tensor" else x.detach().cpu().numpy()

    def _shape(self, per_clip: torch.Tensor | list[torch.Tensor], prep, stack: bool) -> Any:
        if not prep.batched:
            return self._out(per_clip[0], prep.kind)
        if isinstance(per_clip, torch.Tensor):
            return self._out(per_clip, prep.kind)
        if stack or len({p.shape for p in per_clip}) == 1:
            return self._out(torch.stack(per_clip), prep.kind)
        return [self._out(p, prep.kind) for p in per_clip]

    def _prepare(self, audio: AudioInput, sample_rate: int | None):
        return prepare_audio(audio, sample_rate, self.sample_rate, self.frontend.min_samples(), self.device)

    # -- public embedding API -----------------------------------------------------------------------------------
    def frame_embeddings(self, audio: AudioInput, sample_rate: int | None = None, *, reduce: str = "none",
                         batch_size: int | None = None) -> Any:
        """Frame-level embeddings, one per 160 ms step (16 log-mel frames).

        Args:
            audio: see the class docstring.
            sample_rate: rate of array inputs in Hz (required for arrays; resampled to 16 kHz).
            reduce: ``"none"``: the 5 frequency patches concatenated per step, [.., T, 3840];
                ``"mean"``: averaged over the frequency patches, [.., T, 768].
            batch_size: most chunks (10-s log-mel windows) per encoder pass (default 32 on CPU, 256 on CUDA).
        Returns:
            [B, T, D] (a list of [T_i, D] for clips of different lengths), or [T, D] for a 1-D input.
        """
        if reduce not in ("none", "mean"):
            raise ValueError(f"reduce must be 'none' or 'mean', got {reduce!r}")
        prep = self._prepare(audio, sample_rate)
        frames = self._map_clips(prep.waves, lambda tok, _: self._pool_frames(tok, reduce), batch_size)
        return self._shape(frames, prep, stack=False)

    def _pool_frames(self, tokens: torch.Tensor, reduce: str) -> torch.Tensor:
        """Tokens [..., f, T, D] -> frames [..., T, f*D] (frequency-major per step) or, with "mean", [..., T, D]."""
        if reduce == "mean":
            return tokens.mean(-3)
        *lead, f, T, D = tokens.shape
        return tokens.transpose(-3, -2).reshape(*lead, T, f * D)

    def clip_embeddings(self, audio: AudioInput, sample_rate: int | None = None, *, reduce: str = "none",
                        batch_size: int | None = None) -> Any:
        """Clip-level embeddings: the mean over time of the frame embeddings.

        Returns [B, 3840] ([B, 768] with ``reduce="mean"``), or [D] for a 1-D input.
        """
        if reduce not in ("none", "mean"):
            raise ValueError(f"reduce must be 'none' or 'mean', got {reduce!r}")
        prep = self._prepare(audio, sample_rate)
        clips = self._map_clips(prep.waves, lambda tok, _: self._pool_frames(tok, reduce).mean(-2), batch_size)
        return self._shape(clips, prep, stack=True)

    # -- CLAP -----------------------------------------------------------------------------------------------------
    def _require_head(self) -> nn.Module:
        if self.audio_proj is None:
            raise ValueError(f"model {self.name!r} has no CLAP audio head (an audio-only M2D/M2D-AS checkpoint); "
                             "use an M2D-CLAP model such as 'm2d2-clap-2025' for text-aligned embeddings")
        return self.audio_proj

    def clap_audio_embeddings(self, audio: AudioInput, sample_rate: int | None = None, *, normalize: bool = False,
                              long_audio: str = "auto", batch_size: int | None = None) -> Any:
        """Audio embeddings in the shared audio-text space, [B, 768] ([768] for a 1-D input).

        Args:
            normalize: return unit vectors (the reference returns raw vectors; similarity is cosine either way).
            long_audio: ``"full"``: the head attends over all patch tokens of the whole clip (the reference;
                memory grows with the square of the length); ``"chunks"``: the head runs per 10-s chunk and the
                chunk embeddings are averaged (bounded memory, an approximation); ``"auto"`` (default): full up
                to 300 s, chunks beyond.
        """
        head = self._require_head()
        if long_audio not in ("auto", "full", "chunks"):
            raise ValueError(f"long_audio must be 'auto', 'full' or 'chunks', got {long_audio!r}")
        prep = self._prepare(audio, sample_rate)
        out = self._clap_audio(head, prep.waves, long_audio, batch_size)
        if normalize:
            out = nn.functional.normalize(out, dim=-1)
        return self._shape(out, prep, stack=True)

    def _clap_audio(self, head: nn.Module, waves: list[torch.Tensor], long_audio: str,
                    batch_size: int | None) -> torch.Tensor:
        """CLAP audio embeddings [n, D] float32 of clips (any lengths), in input order."""
        return self._map_clips(waves, lambda tok, n: self._clap_group(head, tok, n, long_audio, batch_size),
                               batch_size)

    def _use_chunks(self, num_samples: int, long_audio: str) -> bool:
        seconds = num_samples / self.sample_rate
        if long_audio == "auto" and seconds > FULL_ATTENTION_MAX_SECONDS:
            log.info("a clip is %.0f s long: the CLAP head runs per 10-s chunk and averages them "
                     "(long_audio='full' attends over the whole clip, with memory growing as length^2)", seconds)
            return True
        return long_audio == "chunks"

    @torch.inference_mode()
    def _clap_group(self, head: nn.Module, tok: torch.Tensor, num_samples: int, long_audio: str,
                    batch_size: int | None) -> torch.Tensor:
        """CLAP audio embeddings of equal-length clips: tokens [b, f, T, D] -> [b, D]."""
        b, f, T, D = tok.shape
        if not self._use_chunks(num_samples, long_audio):
            return self._run_head(head, tok.reshape(b, f * T, D), batch_size)  # token order is irrelevant to the head
        parts = tok.split(self.config.encoder.grid[1], dim=2)  # 10-s chunks
        return torch.stack([self._run_head(head, p.reshape(b, -1, D), batch_size) for p in parts]).mean(0)

    def _clap_from_tokens(self, head: nn.Module, toks: list[torch.Tensor], lengths: list[int], long_audio: str,
                          batch_size: int | None) -> torch.Tensor:
        """CLAP audio embeddings of clips given as per-clip tokens [f, T_i, D] -> [n, D]; clips of one length run
        through the head together."""
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_len.setdefault(n, []).append(i)
        out: list[torch.Tensor | None] = [None] * len(toks)
        for n, idx in by_len.items():
            embs = self._clap_group(head, torch.stack([toks[i] for i in idx]), n, long_audio, batch_size)
            for i, e in zip(idx, embs):
                out[i] = e
        return torch.stack(out)  # type: ignore[arg-type]

    def _run_head(self, head: nn.Module, seqs: torch.Tensor | list[torch.Tensor],
                  batch_size: int | None) -> torch.Tensor:
        """Head over token sets [n, N, D] (or a list of [N_i, D], padded and masked) -> [n, D] float32."""
        mask = None
        if isinstance(seqs, (list, tuple)):
            if not seqs:
                return torch.empty(0, self.embed_dim, device=self.device)
            longest = max(x.shape[0] for x in seqs)
            mask = torch.stack([torch.arange(longest, device=self.device) < x.shape[0] for x in seqs])
            seqs = torch.stack([nn.functional.pad(x, (0, 0, 0, longest - x.shape[0])) for x in seqs])
        max_b = self._max_batch(batch_size)
        outs = []
        for k in range(0, seqs.shape[0], max_b):
            m = None if mask is None or bool(mask[k:k + max_b].all()) else mask[k:k + max_b]
            outs.append(head(seqs[k:k + max_b].to(self.dtype), m).float())
        return torch.cat(outs)

    def _tokenizer_obj(self):
        if self._tokenizer is None:
            from .text import Tokenizer

            self._tokenizer = Tokenizer()
        return self._tokenizer

    @torch.inference_mode()
    def clap_text_embeddings(self, texts: str | Sequence[str], *, normalize: bool = False,
                             batch_size: int = 64, max_length: int = 512) -> torch.Tensor:
        """Text embeddings in the shared audio-text space: [N, 768] for a list, [768] for one string.

        Returns a float32 tensor on the model's device. Texts longer than ``max_length`` WordPiece tokens are
        truncated with a logged warning.
        """
        from .text import check_texts

        if self.text_encoder is None:
            raise ValueError(f"model {self.name!r} has no text encoder; text embeddings need an M2D-CLAP model "
                             "such as 'm2d2-clap-2025'")
        items, single = check_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tok = self._tokenizer_obj()
        outs = []
        for k in range(0, len(items), batch_size):
            ids, mask = tok.encode(items[k:k + batch_size], max_length=max_length)
            outs.append(self.text_encoder(ids.to(self.device), mask.to(self.device)).float())
        out = torch.cat(outs)
        if normalize:
            out = nn.functional.normalize(out, dim=-1)
        return out[0] if single else out

    def zero_shot(self, audio: AudioInput, labels: Sequence[str], sample_rate: int | None = None, *,
                  template: str = DEFAULT_TEMPLATE, scores: str = "softmax", temperature: float = 0.01,
                  batch_size: int | None = None) -> Any:
        """Score audio against text labels.

        Args:
            labels: class names; each is put into ``template`` (default ``"{label} can be heard"``).
            scores: ``"softmax"`` (default): probabilities over the labels (single-label); ``"cosine"``: raw
                cosine similarities in [-1, 1], independent per label (use for multi-label, thresholding
                or ranking).
            temperature: softmax temperature applied to cosine similarities (0.01, i.e. logits x 100, as CLAP).
        Returns:
            [B, N] (or [N] for one 1-D input / one file), following the input kind.
        """
        if isinstance(labels, str):
            raise TypeError("labels must be a list of strings, e.g. ['dog', 'rain'], not one string")
        labels = list(labels)
        if not labels:
            raise ValueError("labels is empty; pass at least one label")
        if "{label}" not in template:
            raise ValueError(f"template must contain '{{label}}', got {template!r}")
        if scores not in ("softmax", "cosine"):
            raise ValueError(f"scores must be 'softmax' or 'cosine', got {scores!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        text = self.clap_text_embeddings([template.format(label=str(lab)) for lab in labels], normalize=True)
        prep = self._prepare(audio, sample_rate)
        a = self._clap_audio(self._require_head(), prep.waves, "auto", batch_size)
        sim = nn.functional.normalize(a, dim=-1) @ text.T
        out = (sim / temperature).softmax(-1) if scores == "softmax" else sim
        return self._shape(out, prep, stack=True)

    def embed_files(self, paths_or_dir: Any, level: str = "clip", **kwargs: Any) -> Any:
        """Embed audio files or folders into an ``EmbeddingSet`` (paths, embeddings, timestamps, failures).

        See :func:`m2d2_embed.files.embed_files` for the arguments (batch_size, num_workers, progress, strict,
        recursive, glob, reduce, normalize)."""
        from .files import embed_files

        return embed_files(self, paths_or_dir, level, **kwargs)


def _bucket(n: int, max_b: int, floor: int | None) -> tuple[int, int]:
    """Micro-batch of the compiled encoder for ``n`` waiting chunks: ``(rows, size)``, run ``rows`` of them padded to
    ``size``. Sizes are max_b, max_b/2, max_b/4, ... (at most 7 of them), so torch.compile sees a handful of batch
    shapes.

    ``floor`` given (CUDA, where a batch below 16 takes as long as 16): all n rows, padded up to the smallest size
    that holds them and is at least ``floor``. ``floor=None`` (CPU, where time grows with the rows): the largest
    size that fits in n, unpadded, the rest left for the next pass; 6 chunks run as 4 + 2, not as 8."""
    smallest = max(1, max_b >> 6)
    if floor is None:
        size = max_b
        while size > n and size // 2 >= smallest:
            size //= 2
        return (size, size) if size <= n else (n, size)
    size, floor = max_b, max(floor, smallest)
    while size // 2 >= n and size // 2 >= floor:
        size //= 2
    return n, size


def similarity(a: Any, b: Any) -> Any:
    """Cosine similarity matrix between two sets of embeddings: [N, D] x [M, D] -> [N, M] (1-D inputs allowed).

    Works on tensors (result on ``a``'s device) or numpy arrays (numpy result)."""
    is_np = not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)
    ta = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    tb = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).to(ta.device)
    if ta.shape[-1] != tb.shape[-1]:
        raise ValueError(f"embedding widths differ: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    if ta.ndim not in (1, 2) or tb.ndim not in (1, 2):
        raise ValueError(f"expected [N, D] or [D] embeddings, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    dt = torch.promote_types(ta.dtype, tb.dtype)
    if not dt.is_floating_point:
        dt = torch.float32
    s = nn.functional.normalize(ta.to(dt), dim=-1) @ nn.functional.normalize(tb.to(dt), dim=-1).T
    return s.numpy() if is_np else s
