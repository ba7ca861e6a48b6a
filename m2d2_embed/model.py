"""M2D2: the public model. One path from audio to every output:

    waveforms --frontend--> log-mel --plan--> chunks --encode--> patch tokens [b, f, T, D] --pool(level)--> outputs

``plan``, ``encode``, ``pool`` and ``embed_stream`` are the engine API that ``files.py``, ``integrations/ray.py`` and
``hear.py`` build on; ``pool`` is the only place that knows what each output level is. Adding a level means adding
it to ``LEVELS`` (and ``FRAME_LEVELS`` if it has one row per time step), to ``pool`` and ``output_dim``, and to the
output writers in ``outputs.py``.
"""

from __future__ import annotations

import logging
import math
import os
import string
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .audio import AudioInput, LogMelSpectrogram, check_path_rate, is_path, prepare_audio, probe, stream_audio
from .config import ModelConfig
from .encoder import AudioEncoder
from .heads import Classifier, build_audio_head

log = logging.getLogger(__name__)

LEVELS = ("clip", "frame", "clap", "tags", "frame_tags")  # output levels of the engine (see ``M2D2.pool``)
FRAME_LEVELS = ("frame", "frame_tags")  # levels with one row per time step (and timestamps)
SCORES = ("sigmoid", "softmax", "logits")
FULL_ATTENTION_MAX_SECONDS = 300.0  # long_audio="auto": the CLAP head attends over the whole clip up to this
STREAM_SECONDS = FULL_ATTENTION_MAX_SECONDS  # files longer than this are decoded and embedded as they stream in
STREAM_STEP_CPU = 8  # chunks per streaming step on the CPU when no batch_size is given (see embed_stream)
DEFAULT_TEMPLATE = "{label} can be heard"  # the upstream zero-shot evaluation prompt


class M2D2(nn.Module):
    """An M2D / M2D-CLAP / M2D2 model: log-mel front end, ViT audio encoder, optional CLAP heads and classifier.

    Build it with :func:`m2d2_embed.load`. Embedding methods take audio as a float tensor or numpy array
    ([samples] or [batch, samples], any sample rate given by ``sample_rate=``), a list of 1-D arrays of
    different lengths, or file path(s). Outputs follow the input: tensors in -> tensors on the model's device,
    numpy or paths in -> numpy; a 1-D input gives outputs without the batch axis. Outputs are float32.
    """

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
        self.classifier = Classifier(config.classifier) if config.classifier else None
        self.compiled = False  # set by load(compile=True): full chunks run through the compiled encoder
        self.backend = "torch"  # who runs the encoder (see set_encoder_runner)
        # set by load(dtype="int8" / "fp8"): quantized Linear layers; ``dtype`` stays that of the activations
        self.quantization: str | None = None
        self._runner: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._tokenizer = None
        self.eval()

    # -- properties ----------------------------------------------------------------------------------------
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
        """The activations' dtype: float32, bfloat16 or float16; bfloat16 with ``dtype="fp8"`` and float32 with
        ``"int8"`` (their quantized Linear layers: ``quantization``)."""
        return self.encoder.pos_embed.dtype

    @property
    def embed_dim(self) -> int:
        """Width of one patch token (768)."""
        return self.config.encoder.embed_dim

    @property
    def freq_patches(self) -> int:
        """Frequency patches per time step (5 for 80 mel bins and 16x16 patches, 1 for 80x2 patches)."""
        return self.config.encoder.grid[0]

    @property
    def frame_dim(self) -> int:
        """Width of a stacked frame embedding (frequency patches x 768, e.g. 3840)."""
        return self.freq_patches * self.embed_dim

    @property
    def frame_hop_seconds(self) -> float:
        """Time between frame embeddings inside a chunk: one patch width of log-mel hops (0.16 s for 16x16)."""
        c = self.config
        return c.encoder.patch_size[1] * c.frontend.hop_length / c.frontend.sample_rate

    @property
    def has_classifier(self) -> bool:
        """Whether the model has a task head (``tag``, ``frame_tags``)."""
        return self.classifier is not None

    @property
    def labels(self) -> list[str]:
        """Class names of the classifier, in output order (AudioSet's 527 display names for the AS models)."""
        cfg = self._require_classifier()
        return list(cfg.labels) if cfg.labels else [f"class_{i}" for i in range(cfg.num_classes)]

    def extra_repr(self) -> str:
        backend = "" if self.backend == "torch" else f", backend={self.backend!r}"
        quant = f", quantization={self.quantization!r}" if self.quantization else ""
        return f"name={self.name!r}, sample_rate={self.sample_rate}, dtype={self.dtype}{quant}{backend}"

    def set_encoder_runner(self, runner: Callable[[torch.Tensor], torch.Tensor] | None, backend: str) -> None:
        """Have ``runner`` do every encoder call from now on (``None``: the PyTorch encoder again).

        ``runner``: normalised log-mel chunks [n, 1, n_mels, w] float32 -> tokens [n, f*t, D] float32, exactly
        :class:`m2d2_embed.encoder.AudioEncoder`'s contract. ``load(backend=...)`` sets an ONNX Runtime or OpenVINO
        runner (:mod:`m2d2_embed.backends`); ``self.encoder`` stays, for its config and weights.
        """
        if runner is not None and (self.compiled or self.dtype != torch.float32 or self.quantization):
            raise ValueError("an encoder runner replaces the float32, uncompiled PyTorch encoder only")
        self._runner, self.backend = runner, backend if runner is not None else "torch"

    # -- chunk geometry ----------------------------------------------------------------------------------------
    def plan(self, num_samples: int) -> list[tuple[int, int]]:
        """(first log-mel frame, time patches) of each chunk of a clip of ``num_samples`` at the model's rate.

        Chunks are consecutive and non-overlapping, ``U`` (training width) frames each. The last, shorter chunk
        is zero-padded (in the normalised domain) to whole patches, as in the reference. A chunk never has more
        time patches than the position embedding: frames past them are ignored, as for a full chunk (the
        reference crashes on a last chunk of U - 8 .. U - 1 frames).
        """
        return self._plan_frames(self.frontend.num_frames(int(num_samples)))

    def _plan_frames(self, num_frames: int) -> list[tuple[int, int]]:
        U = self.config.encoder.chunk_frames
        pw = self.config.encoder.patch_size[1]
        T = self.config.encoder.grid[1]
        return [(start, min(T, math.ceil(min(U, num_frames - start) / pw))) for start in range(0, num_frames, U)]

    def num_chunks(self, num_samples: int) -> int:
        """Encoder chunks of a clip of ``num_samples`` at the model's rate (the unit of ``batch_size``)."""
        return self.config.num_chunks(num_samples)

    def num_frames_for(self, num_samples: int) -> int:
        """Number of frame embeddings for ``num_samples`` at the model's rate."""
        return sum(t for _, t in self.plan(num_samples))

    def frame_timestamps(self, num_samples: int, sample_rate: int | None = None, align: str = "center") -> np.ndarray:
        """Times of the frame embeddings of a clip, in seconds, float64 [T].

        Args:
            num_samples: length of the clip in samples at ``sample_rate``.
            sample_rate: rate of ``num_samples`` (default: the model's rate).
            align: ``"center"`` (default): the centre of the log-mel frames each embedding covers (a patch is
                ``frame_hop_seconds`` long; chunk boundaries are respected). ``"reference"``: the upstream
                runtime's ``i * duration / T``, which spreads the steps evenly over the clip.
        """
        if int(num_samples) <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        sr = sample_rate or self.sample_rate
        n = int(num_samples) if sr == self.sample_rate else round(int(num_samples) * self.sample_rate / sr)
        plan = self.plan(n)
        if align == "reference":
            T = sum(t for _, t in plan)
            return np.arange(T, dtype=np.float64) * (int(num_samples) / sr) / T
        if align != "center":
            raise ValueError(f"align must be 'center' or 'reference', got {align!r}")
        pw = self.config.encoder.patch_size[1]
        hop_s = self.config.frontend.hop_length / self.sample_rate
        centres = [start + j * pw + (pw - 1) / 2 for start, t in plan for j in range(t)]
        return np.asarray(centres, dtype=np.float64) * hop_s  # centred STFT: frame k is centred at k * hop

    # -- public API: audio -> embeddings, tags ---------------------------------------------------------------
    def frame_embeddings(
        self, audio: AudioInput, sample_rate: int | None = None, *, reduce: str = "none", batch_size: int | None = None
    ) -> Any:
        """Frame-level embeddings, one per time step (``frame_hop_seconds``: 160 ms for 16x16 patches).

        Args:
            audio: see the class docstring.
            sample_rate: rate of array inputs in Hz (required for arrays; resampled to the model's rate).
            reduce: ``"none"``: the frequency patches concatenated per step, [.., T, 3840];
                ``"mean"``: averaged over the frequency patches, [.., T, 768].
            batch_size: most chunks (10-s log-mel windows) per encoder pass (default 32 on CPU, 256 on CUDA).
        Returns:
            [B, T, D] (a list of [T_i, D] for clips of different lengths), or [T, D] for a 1-D input.
        """
        return self._embed(audio, sample_rate, "frame", reduce=reduce, batch_size=batch_size)

    def clip_embeddings(
        self, audio: AudioInput, sample_rate: int | None = None, *, reduce: str = "none", batch_size: int | None = None
    ) -> Any:
        """Clip-level embeddings: the mean over time of the frame embeddings.

        Returns [B, 3840] ([B, 768] with ``reduce="mean"``), or [D] for a 1-D input.
        """
        return self._embed(audio, sample_rate, "clip", reduce=reduce, batch_size=batch_size)

    def clap_audio_embeddings(
        self,
        audio: AudioInput,
        sample_rate: int | None = None,
        *,
        normalize: bool = False,
        long_audio: str = "auto",
        batch_size: int | None = None,
    ) -> Any:
        """Audio embeddings in the shared audio-text space, [B, 768] ([768] for a 1-D input).

        Args:
            normalize: return unit vectors (the reference returns raw vectors; similarity is cosine either way).
            long_audio: ``"full"``: the head attends over all patch tokens of the whole clip (the reference;
                memory grows with the square of the length); ``"chunks"``: the head runs per 10-s chunk and the
                chunk embeddings are averaged (bounded memory, an approximation); ``"auto"`` (default): full up
                to 300 s, chunks beyond.
        """
        return self._embed(
            audio, sample_rate, "clap", long_audio=long_audio, normalize=normalize, batch_size=batch_size
        )

    def tag(
        self,
        audio: AudioInput,
        sample_rate: int | None = None,
        *,
        scores: str = "sigmoid",
        top_k: int | None = None,
        batch_size: int | None = None,
    ) -> Any:
        """Clip-level class scores of a fine-tuned model (audio tagging), exactly as upstream's ``forward``: the
        classifier on the time-averaged features.

        Args:
            scores: ``"sigmoid"`` (default; AudioSet is multi-label), ``"softmax"`` or ``"logits"``.
            top_k: instead of the score matrix, return the ``top_k`` best ``(label, score)`` pairs of each clip,
                best first (a list per clip; one list for a 1-D input).
        Returns:
            [B, C] scores (C = ``len(model.labels)``), or [C] for a 1-D input; following the input kind.
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        out = self._embed(audio, sample_rate, "tags", scores=scores, batch_size=batch_size)
        if top_k is None:
            return out
        labels = self.labels
        rows = torch.as_tensor(out).reshape(-1, len(labels))
        best = [[(labels[j], float(r[j])) for j in r.argsort(descending=True)[:top_k].tolist()] for r in rows]
        return best if torch.as_tensor(out).ndim == 2 else best[0]

    def frame_tags(
        self,
        audio: AudioInput,
        sample_rate: int | None = None,
        *,
        scores: str = "sigmoid",
        batch_size: int | None = None,
    ) -> Any:
        """Per-frame class scores (sound event detection), exactly as upstream's ``forward_frames``: the classifier
        on each frame's features, aligned with :meth:`frame_timestamps`.

        Returns [B, T, C] (a list of [T_i, C] for clips of different lengths), or [T, C] for a 1-D input.
        """
        return self._embed(audio, sample_rate, "frame_tags", scores=scores, batch_size=batch_size)

    def embed_files(self, paths_or_dir: Any, level: str = "clip", **kwargs: Any) -> Any:
        """Embed audio files or folders into an ``EmbeddingSet`` (paths, embeddings, timestamps, failures).

        See :func:`m2d2_embed.files.embed_files` for the arguments (batch_size, num_workers, progress, strict,
        recursive, glob, reduce, normalize)."""
        from .files import embed_files

        return embed_files(self, paths_or_dir, level, **kwargs)

    def _embed(
        self,
        audio: AudioInput,
        sample_rate: int | None,
        level: str,
        *,
        reduce: str = "none",
        long_audio: str = "auto",
        scores: str = "default",
        normalize: bool = False,
        batch_size: int | None = None,
    ) -> Any:
        """The one path of every array-API method: check, prepare, embed (streaming long files), shape."""
        self.check_level(level, reduce, long_audio=long_audio, scores=scores)
        opts = {"reduce": reduce, "long_audio": long_audio, "scores": scores, "batch_size": batch_size}
        paths = (
            [audio]
            if is_path(audio)
            else audio
            if isinstance(audio, (list, tuple)) and audio and all(is_path(a) for a in audio)
            else None
        )
        long = {i for i, p in enumerate(paths) if probe(p).duration > STREAM_SECONDS} if paths is not None else set()
        if long:  # long files are never decoded whole
            out: Any = self._embed_paths(paths, long, sample_rate, level, opts)  # type: ignore[arg-type]
            kind, batched = "path", not is_path(audio)
        else:
            prep = prepare_audio(audio, sample_rate, self.sample_rate, self.frontend.min_samples(), self.device)
            out = self.embed_waves(prep.waves, level, **opts)
            kind, batched = prep.kind, prep.batched
        if normalize:
            out = (
                nn.functional.normalize(out, dim=-1)
                if isinstance(out, torch.Tensor)
                else [nn.functional.normalize(o, dim=-1) for o in out]
            )
        return _shape(out, kind, batched)

    def _embed_paths(
        self, paths: Sequence[str | os.PathLike], long: set[int], sample_rate: int | None, level: str, opts: dict
    ) -> Any:
        """Files by path: those at indices ``long`` streamed one by one, the others embedded together. Per-file
        outputs in input order, stacked when their shapes agree."""
        check_path_rate(sample_rate, self.sample_rate)
        outs: list[Any] = [None] * len(paths)
        short = [i for i in range(len(paths)) if i not in long]
        if short:
            prep = prepare_audio(
                [paths[i] for i in short], None, self.sample_rate, self.frontend.min_samples(), self.device
            )
            for i, o in zip(short, self.embed_waves(prep.waves, level, **opts)):
                outs[i] = o
        for i in sorted(long):
            outs[i] = self.embed_stream(stream_audio(paths[i], self.sample_rate), level, **opts)[0]
        return torch.stack(outs) if len({o.shape for o in outs}) == 1 else outs

    # -- CLAP text side and zero-shot ---------------------------------------------------------------------------
    @torch.inference_mode()
    def clap_text_embeddings(
        self, texts: str | Sequence[str], *, normalize: bool = False, batch_size: int = 64, max_length: int = 512
    ) -> torch.Tensor:
        """Text embeddings in the shared audio-text space: [N, 768] for a list, [768] for one string.

        Returns a float32 tensor on the model's device. Texts longer than ``max_length`` WordPiece tokens are
        truncated with a logged warning.
        """
        from .text import Tokenizer, check_texts

        if self.text_encoder is None:
            raise ValueError(
                f"model {self.name!r} has no text encoder; text embeddings need an M2D-CLAP model "
                "such as 'm2d2-clap-2025'"
            )
        items, single = check_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self._tokenizer is None:
            self._tokenizer = Tokenizer()
        outs = []
        for k in range(0, len(items), batch_size):
            ids, mask = self._tokenizer.encode(items[k : k + batch_size], max_length=max_length)
            outs.append(self.text_encoder(ids.to(self.device), mask.to(self.device)).float())
        out = torch.cat(outs)
        if normalize:
            out = nn.functional.normalize(out, dim=-1)
        return out[0] if single else out

    def zero_shot(
        self,
        audio: AudioInput,
        labels: Sequence[str],
        sample_rate: int | None = None,
        *,
        template: str = DEFAULT_TEMPLATE,
        scores: str = "softmax",
        temperature: float = 0.01,
        batch_size: int | None = None,
    ) -> Any:
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
        prompts = _prompts(labels, template)  # checked before any audio work
        _check_scoring(scores, temperature)
        audio_emb = self.clap_audio_embeddings(audio, sample_rate, batch_size=batch_size)
        out = self.zero_shot_scores(
            torch.as_tensor(audio_emb, device=self.device),
            prompts,
            template="{label}",
            scores=scores,
            temperature=temperature,
        )
        return out if isinstance(audio_emb, torch.Tensor) else out.cpu().numpy()

    @torch.inference_mode()
    def zero_shot_scores(
        self,
        audio_embeddings: Any,
        labels: Sequence[str],
        *,
        template: str = DEFAULT_TEMPLATE,
        scores: str = "softmax",
        temperature: float = 0.01,
    ) -> torch.Tensor:
        """Zero-shot scores of CLAP audio embeddings already computed ([N, 768] or [768], any norm) against
        ``labels``: [N, L] (or [L]) float32 on the model's device. See :meth:`zero_shot` for the arguments."""
        prompts = _prompts(labels, template)
        _check_scoring(scores, temperature)
        text = self.clap_text_embeddings(prompts, normalize=True)
        a = torch.as_tensor(
            np.asarray(audio_embeddings) if not isinstance(audio_embeddings, torch.Tensor) else audio_embeddings
        ).to(self.device, torch.float32)
        sim = nn.functional.normalize(a, dim=-1) @ text.T
        return (sim / temperature).softmax(-1) if scores == "softmax" else sim

    # -- engine API ------------------------------------------------------------------------------------------------
    def check_level(
        self,
        level: str,
        reduce: str = "none",
        *,
        long_audio: str = "auto",
        scores: str = "default",
        normalize: bool = False,
    ) -> None:
        """Raise a clear ValueError if this model cannot produce ``level`` with these options."""
        if normalize and level in ("tags", "frame_tags"):
            raise ValueError(f"normalize=True does not apply to class scores (level {level!r})")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        if reduce not in ("none", "mean"):
            raise ValueError(f"reduce must be 'none' or 'mean', got {reduce!r}")
        if long_audio not in ("auto", "full", "chunks"):
            raise ValueError(f"long_audio must be 'auto', 'full' or 'chunks', got {long_audio!r}")
        if scores not in (*SCORES, "default"):
            raise ValueError(f"scores must be one of {', '.join(SCORES)}, got {scores!r}")
        if level == "clap":
            self._require_head()
        if level in ("tags", "frame_tags"):
            self._require_classifier()

    def describe(self, level: str, reduce: str = "none") -> dict[str, Any]:
        """What outputs at ``level`` are, for the metadata of saved outputs: ``dim``, the ``reduce`` that applies
        ("none" where it does not), and the class ``labels`` for tags levels."""
        info: dict[str, Any] = {
            "dim": self.output_dim(level, reduce),
            "reduce": reduce if level in ("clip", "frame") else "none",
        }
        if level in ("tags", "frame_tags"):
            info["labels"] = self.labels
        return info

    def output_dim(self, level: str, reduce: str = "none") -> int:
        """Width of one output vector at ``level``: 3840 / 768 (clip, frame), the CLAP size, or the class count."""
        if level == "clap":
            self._require_head()
            return self.config.audio_head.out_dim  # type: ignore[union-attr]
        if level in ("tags", "frame_tags"):
            return self._require_classifier().num_classes
        return self.embed_dim if reduce == "mean" else self.frame_dim

    @torch.inference_mode()
    def encode(self, groups: Sequence[torch.Tensor], batch_size: int | None = None) -> list[torch.Tensor]:
        """Patch tokens of groups of equal-length clips: waveforms [b, N] float32 at the model's rate (N may
        differ between groups; any device, pinned host memory is copied without blocking) -> tokens
        [b, f, T, D] float32 per group (frequency patches, time steps, width; chunks joined in time).

        Clips of one group share one front-end call; chunks of one width from all groups run through the encoder
        together, at most ``batch_size`` per pass. Nothing loops over clips.
        """
        pw = self.config.encoder.patch_size[1]
        jobs: dict[int, list[tuple[int, int, torch.Tensor]]] = {}  # time patches -> [(group, chunk, log-mel)]
        n_chunks = []
        for g, x in enumerate(groups):
            lms = self.frontend(x.to(self.device, torch.float32, non_blocking=True))  # (b, 1, n_mels, F)
            plan = self._plan_frames(lms.shape[-1])
            n_chunks.append(len(plan))
            for c, (start, t) in enumerate(plan):
                jobs.setdefault(t, []).append((g, c, _pad_to(lms[..., start : start + t * pw], t * pw)))
        return self._encode_chunks(jobs, n_chunks, batch_size)

    @torch.inference_mode()
    def pool(
        self,
        tokens: torch.Tensor,
        level: str,
        *,
        reduce: str = "none",
        num_samples: int | None = None,
        long_audio: str = "auto",
        scores: str = "default",
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """The one level dispatch: patch tokens [b, f, T, D] of ``b`` equal-length clips -> outputs at ``level``.

        ``frame``: [b, T, D] (D = f x 768 stacked, or 768 with ``reduce="mean"``); ``clip``: [b, D], the mean over
        time of the frames; ``clap``: [b, 768] in the audio-text space (``num_samples``, the clips' length,
        decides ``long_audio="auto"``); ``tags``: [b, C] class scores of the time-averaged features, as
        upstream's ``forward``; ``frame_tags``: [b, T, C] per-frame class scores, as upstream's
        ``forward_frames``. ``scores`` (tags levels): ``"sigmoid"``, ``"softmax"``, ``"logits"``, or
        ``"default"``: sigmoid for a multi-label head, softmax for a single-label one.
        """
        if level == "frame":
            return _frames(tokens, reduce)
        if level == "clip":
            return _frames(tokens, reduce).mean(-2)
        if level == "clap":
            return self._clap(tokens, num_samples, long_audio, batch_size)
        if level in ("tags", "frame_tags"):
            cfg = self._require_classifier()
            feats = _frames(tokens, self._tag_reduce())
            logits = self.classifier(feats.mean(-2) if level == "tags" else feats)  # type: ignore[misc]
            return _activate(logits, cfg.multi_label, scores)
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")

    def embed_waves(self, waves: Sequence[torch.Tensor], level: str | Sequence[str], **opts: Any) -> Any:
        """Outputs of 1-D float32 waveforms at the model's rate: for one level, a tensor [n, ...] in input order
        when every clip's output has the same shape, else a list of per-clip tensors; for several levels (one
        encoder pass), a dict level -> that. ``opts``: ``pool``'s options (reduce, long_audio, scores) and
        ``batch_size``."""
        levels = [level] if isinstance(level, str) else list(level)
        bs = opts.get("batch_size")
        pool_opts = {k: v for k, v in opts.items() if k != "batch_size"}
        out = self._map_clips(
            waves, lambda tok, n: [self.pool(tok, lv, num_samples=n, batch_size=bs, **pool_opts) for lv in levels], bs
        )
        return out[0] if isinstance(level, str) else dict(zip(levels, out))

    @torch.inference_mode()
    def embed_stream(
        self,
        blocks: Iterable[np.ndarray],
        level: str,
        *,
        reduce: str = "none",
        scores: str = "default",
        long_audio: str = "chunks",
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Outputs of one clip that arrives as mono float32 blocks at the model's rate (``audio.stream_audio``),
        embedded while it streams in: memory stays bounded whatever the length (at frame levels the output
        itself grows). Returns (the output at ``level`` without the batch axis, the clip's length in samples).

        Log-mel and encoder run on steps of ``batch_size`` whole chunks; each step's log-mel is computed on its
        samples plus ``margin`` samples of context on each side, so every frame sees the same samples as in a
        whole-clip log-mel, and the last step uses the clip's true end. Per-frame levels are concatenated; clip
        levels average the per-frame features (clip, tags) or, for clap, the per-chunk head outputs (the
        ``long_audio="chunks"`` approximation, whatever ``long_audio`` says).
        """
        self.check_level(level, reduce, long_audio=long_audio, scores=scores)
        fe, U = self.config.frontend, self.config.encoder.chunk_frames
        hop = fe.hop_length
        margin = hop * math.ceil((fe.n_fft // 2) / hop)  # context samples, a whole number of hops
        # chunks per step: one encoder batch; on the CPU 8 by default (80 s of audio: as fast as 32 on a 2-core
        # Zen 4, and 0.35 GiB less peak memory for the default model)
        step = self.max_batch(batch_size) if batch_size is not None or self.device.type != "cpu" else STREAM_STEP_CPU
        t_full = self._plan_frames(U)[0][1]
        parts: list[torch.Tensor] = []  # per-frame outputs (frame levels) or per-step sums (clip levels)
        count = 0  # frames (clip, tags) or chunks (clap) summed
        buf, buf_start, next_chunk, total = np.zeros(0, np.float32), 0, 0, 0

        def add(a: int, end: int | None, chunks: list[tuple[int, int]]) -> None:
            nonlocal count
            s = next_chunk * U * hop  # centre of the first frame of this step
            seg = torch.from_numpy(np.ascontiguousarray(buf[a - buf_start : None if end is None else end - buf_start]))
            lms = self.frontend(seg.to(self.device)[None])[..., (s - a) // hop :]  # (1, 1, n_mels, F)
            pw = self.config.encoder.patch_size[1]
            jobs: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
            for c, (start, t) in enumerate(chunks):
                jobs.setdefault(t, []).append((c, 0, _pad_to(lms[..., start : start + t * pw], t * pw)))
            toks = self._encode_chunks(jobs, [1] * len(chunks), batch_size)  # per chunk [1, f, t, D]
            if level in FRAME_LEVELS:
                parts.extend(self.pool(tok, level, reduce=reduce, scores=scores)[0].cpu() for tok in toks)
            elif level == "clap":
                parts.append(sum(self.pool(tok, "clap", long_audio="full")[0].double() for tok in toks))
                count += len(toks)
            else:  # clip, tags: the sum of the per-frame features the level averages
                frames = torch.cat([_frames(tok, reduce if level == "clip" else self._tag_reduce())[0] for tok in toks])
                parts.append(frames.double().sum(0))
                count += frames.shape[0]

        for block in blocks:
            buf = np.concatenate([buf, block]) if len(buf) else block
            total += len(block)
            while True:
                s = next_chunk * U * hop
                end = s + step * U * hop + margin
                if buf_start + len(buf) < end:
                    break
                add(max(0, s - margin), end, [(c * U, t_full) for c in range(step)])
                next_chunk += step
                keep_from = next_chunk * U * hop - margin
                buf, buf_start = buf[keep_from - buf_start :].copy(), keep_from
        min_samples = self.frontend.min_samples()
        if total < min_samples:
            raise ValueError(f"the audio is too short: {total} samples, the model needs at least {min_samples}")
        rest = self.plan(total)[next_chunk:]
        if rest:
            add(max(0, next_chunk * U * hop - margin), None, [(start - next_chunk * U, t) for start, t in rest])
        if level in FRAME_LEVELS:
            return torch.cat(parts).to(self.device), total
        mean = (sum(parts) / count).float().to(self.device)
        if level == "tags":
            cfg = self.config.classifier
            return _activate(self.classifier(mean), cfg.multi_label, scores), total  # type: ignore[misc,union-attr]
        return mean, total

    # -- heads -------------------------------------------------------------------------------------------------------
    def _require_head(self) -> nn.Module:
        if self.audio_proj is None:
            raise ValueError(
                f"model {self.name!r} has no CLAP audio head (an audio-only M2D/M2D-AS checkpoint); "
                "use an M2D-CLAP model such as 'm2d2-clap-2025' for text-aligned embeddings"
            )
        return self.audio_proj

    def _require_classifier(self):
        if self.config.classifier is None:
            from .registry import tagging_models

            raise ValueError(
                f"model {self.name!r} has no classifier head, so it cannot tag; use a model fine-tuned "
                f"on AudioSet ({', '.join(tagging_models())}) or one you fine-tuned with "
                "`m2d2_embed.train finetune`"
            )
        return self.config.classifier

    def _tag_reduce(self) -> str:
        """The features the classifier takes, as upstream picks them: frames averaged over frequency patches when
        its input is one token wide (768), stacked (3840) otherwise."""
        return "mean" if self._require_classifier().in_features == self.embed_dim else "none"

    def _clap(
        self, tokens: torch.Tensor, num_samples: int | None, long_audio: str, batch_size: int | None
    ) -> torch.Tensor:
        """CLAP audio embeddings of equal-length clips: tokens [b, f, T, D] -> [b, D]."""
        head = self._require_head()
        b, f, T, D = tokens.shape
        seconds = (num_samples or 0) / self.sample_rate
        chunks = long_audio == "chunks" or (long_audio == "auto" and seconds > FULL_ATTENTION_MAX_SECONDS)
        if long_audio == "auto" and chunks:
            log.info(
                "a clip is %.0f s long: the CLAP head runs per 10-s chunk and averages them "
                "(long_audio='full' attends over the whole clip, with memory growing as length^2)",
                seconds,
            )
        if not chunks:
            return self._run_head(head, tokens.reshape(b, f * T, D), batch_size)  # token order is irrelevant
        parts = tokens.split(self.config.encoder.grid[1], dim=2)  # 10-s chunks
        return torch.stack([self._run_head(head, p.reshape(b, -1, D), batch_size) for p in parts]).mean(0)

    def _run_head(self, head: nn.Module, seqs: torch.Tensor, batch_size: int | None) -> torch.Tensor:
        """Head over token sets [n, N, D] -> [n, D] float32, at most ``batch_size`` sets per call."""
        max_b = self.max_batch(batch_size)
        return torch.cat([head(seqs[k : k + max_b].to(self.dtype)).float() for k in range(0, seqs.shape[0], max_b)])

    # -- performance: batching, memory, compilation ----------------------------------------------------------------
    # Everything below changes how fast outputs come, never what they are: clips are grouped by length so that
    # equal-length clips stay stacked from front end to pooling; chunks of one width run through the encoder in
    # micro-batches of ``batch_size``; a CUDA out-of-memory error halves the micro-batch and retries; a compiled
    # encoder sees a handful of padded batch sizes (``_bucket``) so it never recompiles per batch.
    def max_batch(self, batch_size: int | None = None) -> int:
        """Chunks per encoder pass: ``batch_size``, or 256 on CUDA and 32 elsewhere."""
        return max_batch(batch_size, self.device)

    def _map_clips(
        self,
        waves: Sequence[torch.Tensor],
        fn: Callable[[torch.Tensor, int], list[torch.Tensor]],
        batch_size: int | None,
    ) -> list[Any]:
        """Encode clips group by group and apply ``fn(tokens [b, f, T, D], num_samples) -> [outputs [b, ...]]`` to
        each group of equal-length clips. Returns, per output of ``fn``, the results in input order: one tensor
        [n, ...] when every clip's result has the same shape, else a list of per-clip tensors.

        Clips are taken in order of length and at most four encoder batches of chunks (or one clip) are encoded at
        a time, so 10,000 clips or an hour-long clip never hold all their tokens at once.
        """
        budget = 4 * self.max_batch(batch_size)
        pieces: list[tuple[list[int], list[torch.Tensor]]] = []  # (input indices, fn's outputs for them)

        def flush(group: list[int]) -> None:
            by_len: dict[int, list[int]] = {}
            for i in group:
                by_len.setdefault(waves[i].shape[-1], []).append(i)
            idx = list(by_len.values())
            stacked = [waves[g[0]][None] if len(g) == 1 else torch.stack([waves[i] for i in g]) for g in idx]
            for g, tok in zip(idx, self.encode(stacked, batch_size)):
                pieces.append((g, fn(tok, waves[g[0]].shape[-1])))

        n_chunks: dict[int, int] = {}  # chunks per clip length, computed once per distinct length
        group: list[int] = []
        n = 0
        for i in sorted(range(len(waves)), key=lambda i: waves[i].shape[-1]):
            L = waves[i].shape[-1]
            c = n_chunks.setdefault(L, self.num_chunks(L))
            if group and n + c > budget:
                flush(group)
                group, n = [], 0
            group.append(i)
            n += c
        if group:
            flush(group)
        order = torch.tensor([i for idx, _ in pieces for i in idx])
        results = []
        for k in range(len(pieces[0][1])):
            outs = [r[k] for _, r in pieces]
            if len({tuple(o.shape[1:]) for o in outs}) == 1:  # one tensor, in input order with one scatter
                cat = torch.cat(outs) if len(outs) > 1 else outs[0]
                if not bool((order == torch.arange(len(order))).all()):
                    cat = torch.empty_like(cat).index_copy_(0, order.to(cat.device), cat)
                results.append(cat)
            else:
                per_clip: list[Any] = [None] * len(waves)
                for i, o in zip(order.tolist(), (row for rows in outs for row in rows)):
                    per_clip[i] = o
                results.append(per_clip)
        return results

    def _encode_chunks(
        self, jobs: dict[int, list[tuple[int, int, torch.Tensor]]], n_chunks: list[int], batch_size: int | None
    ) -> list[torch.Tensor]:
        """Log-mel chunks grouped by time patches ``t`` -> ``(group, chunk index, [b, 1, n_mels, t*pw])`` through
        the encoder, one width at a time; returns per group the tokens [b, f, T, D] with its chunks joined."""
        f, D = self.freq_patches, self.embed_dim
        results: dict[tuple[int, int], torch.Tensor] = {}
        max_b = self.max_batch(batch_size)
        for t, items in jobs.items():
            batch = torch.cat([ch for _, _, ch in items]) if len(items) > 1 else items[0][2]  # (n, 1, n_mels, w)
            tokens = self._run_encoder(batch, max_b).reshape(-1, f, t, D)  # (n, f, t, D)
            for (g, c, _), part in zip(items, tokens.split([ch.shape[0] for _, _, ch in items])):
                results[(g, c)] = part
        out = []
        for g, n in enumerate(n_chunks):
            parts = [results[(g, c)] for c in range(n)]
            out.append(parts[0] if n == 1 else torch.cat(parts, dim=2))  # chunks joined in time
        return out

    def _run_encoder(self, batch: torch.Tensor, max_b: int) -> torch.Tensor:
        """Encoder over chunks of one width: [n, 1, n_mels, w] -> [n, f*t, D] float32, at most ``max_b`` per pass.

        On CUDA out-of-memory the micro-batch is halved and retried. With a compiled encoder, full-width chunks
        go through the compiled graph in micro-batches zero-padded to a bucket size (few shapes, no recompiles;
        rows are independent, so the padding does not change the real rows); other widths run eagerly.
        """
        T = self.config.encoder.grid[1]
        compiled = self.compiled and batch.shape[-1] == T * self.config.encoder.patch_size[1]
        encode = self.encoder if compiled or not self.compiled else self.encoder.forward  # forward: eager
        encode = self._runner or encode  # load(backend=...): another runtime runs the encoder
        outs, i = [], 0
        while i < batch.shape[0]:
            x = batch[i : i + max_b].to(self.dtype)
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


def max_batch(batch_size: int | None, device: torch.device) -> int:
    """Chunks per encoder pass on ``device``: ``batch_size`` (checked), or 256 on CUDA and 32 elsewhere."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return batch_size
    return 256 if device.type == "cuda" else 32


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


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------------------------


def _pad_to(chunk: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad a log-mel chunk [..., w] to ``width`` frames (0 in the normalised domain, as the reference)."""
    return chunk if chunk.shape[-1] >= width else nn.functional.pad(chunk, (0, width - chunk.shape[-1]))


def _frames(tokens: torch.Tensor, reduce: str) -> torch.Tensor:
    """Tokens [..., f, T, D] -> frames [..., T, f*D] (frequency-major per step) or, with "mean", [..., T, D]."""
    if reduce == "mean":
        return tokens.mean(-3)
    *lead, f, T, D = tokens.shape
    return tokens.transpose(-3, -2).reshape(*lead, T, f * D)


def _activate(logits: torch.Tensor, multi_label: bool, scores: str) -> torch.Tensor:
    if scores == "default":
        scores = "sigmoid" if multi_label else "softmax"
    if scores == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(-1) if scores == "softmax" else logits


def _shape(out: torch.Tensor | list[torch.Tensor], kind: str, batched: bool) -> Any:
    """Outputs as the input came: tensors stay tensors, numpy and paths give numpy; no batch axis for a 1-D input."""

    def conv(x: torch.Tensor) -> Any:
        return x if kind == "tensor" else x.detach().cpu().numpy()

    if not batched:
        return conv(out[0])
    return conv(out) if isinstance(out, torch.Tensor) else [conv(o) for o in out]


def _prompts(labels: Sequence[str], template: str) -> list[str]:
    if labels is None or isinstance(labels, str) or not isinstance(labels, Iterable):
        raise TypeError(f"labels must be a list of strings (class names), e.g. ['dog', 'rain'], got {labels!r}")
    labels = list(labels)
    if not labels:
        raise ValueError("labels is empty; pass at least one label, e.g. ['dog', 'rain']")
    if not isinstance(template, str):
        raise TypeError(f"template must be a string containing '{{label}}', got {template!r}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(
            f"template {template!r} is not a valid format string ({e}); write it like "
            "'the sound of {label}' (use {{ and }} for literal braces)"
        ) from e
    if fields != {"label"}:
        other = sorted(fields - {"label"})
        raise ValueError(
            "template must contain the placeholder {label} and no other"
            + (f" (found {', '.join('{' + f + '}' for f in other)})" if other else "")
            + f"; got {template!r}, e.g. '{DEFAULT_TEMPLATE}'"
        )
    return [template.format(label=str(lab)) for lab in labels]


def _check_scoring(scores: str, temperature: float) -> None:
    if scores not in ("softmax", "cosine"):
        raise ValueError(f"scores must be 'softmax' or 'cosine', got {scores!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def detect_events(
    frame_scores: Any, timestamps: Any, labels: Sequence[str], threshold: float, hop_seconds: float
) -> list[dict[str, Any]]:
    """Sound events from per-frame scores: runs of consecutive frames whose score for a class is at least
    ``threshold`` become one event each.

    Args:
        frame_scores: [T, C] scores (e.g. ``model.frame_tags(x)`` of one clip).
        timestamps: [T] seconds, the centre of each frame (``model.frame_timestamps``).
        labels: C class names.
        threshold: the score a frame needs to count as active.
        hop_seconds: the length of one frame (``model.frame_hop_seconds``).
    Returns:
        ``[{"onset": s, "offset": s, "label": str, "score": max score in the event}]`` sorted by onset, then label.
    """
    s = np.asarray(frame_scores, dtype=np.float64)
    ts = np.asarray(timestamps, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != ts.shape[0] or s.shape[1] != len(labels):
        raise ValueError(
            f"frame_scores {s.shape}, timestamps {ts.shape} and {len(labels)} labels do not match; "
            "expected [T, C], [T] and C labels"
        )
    events = []
    active = s >= threshold
    for c in np.flatnonzero(active.any(0)):
        on = np.flatnonzero(np.diff(np.concatenate([[0], active[:, c].astype(np.int8), [0]])) != 0).reshape(-1, 2)
        for a, b in on:  # frames a .. b-1
            events.append(
                {
                    "onset": max(0.0, float(ts[a] - hop_seconds / 2)),
                    "offset": float(ts[b - 1] + hop_seconds / 2),
                    "label": labels[c],
                    "score": float(s[a:b, c].max()),
                }
            )
    return sorted(events, key=lambda e: (e["onset"], e["label"]))


def similarity(a: Any, b: Any) -> Any:
    """Cosine similarity between two sets of embeddings: [N, D] x [M, D] -> [N, M]. A 1-D input stands for one
    embedding and keeps its axis out of the result: [D] x [M, D] -> [M], [N, D] x [D] -> [N], [D] x [D] -> [].

    Works on tensors (result on ``a``'s device) or numpy arrays (numpy result)."""
    is_np = not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)
    ta = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    tb = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).to(ta.device)
    if ta.ndim not in (1, 2) or tb.ndim not in (1, 2):
        raise ValueError(f"expected [N, D] or [D] embeddings, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    if ta.shape[-1] != tb.shape[-1]:
        raise ValueError(f"embedding widths differ: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    dt = torch.promote_types(ta.dtype, tb.dtype)
    if not dt.is_floating_point:
        dt = torch.float32
    na, nb = nn.functional.normalize(ta.to(dt), dim=-1), nn.functional.normalize(tb.to(dt), dim=-1)
    s = na @ (nb.T if nb.ndim == 2 else nb)
    return s.numpy() if is_np else s
