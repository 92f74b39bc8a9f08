"""Batches of the stages without the splice: 2.1a's CTC head (speech and unit labels) and 3.2's speech
decoder (reply tokens and their codec ids). The LM stages' batches: :mod:`vita_jax.data.batch`."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from vita_jax.data import audio as audio_lib
from vita_jax.sizes import round_up


def ctc_batch(waves: Sequence[np.ndarray], texts: Sequence[str], vocab, frame_bucket: int = 64,
              label_width: Optional[int] = None) -> dict:
    """16 kHz waveforms and transcripts -> ``feats [B, T, 80]`` (T a multiple of
    ``frame_bucket``), ``lengths``, ``labels [B, W]`` (unit ids) and ``label_mask`` (W =
    ``label_width`` or the longest transcript)."""
    feats, lengths = audio_lib.pad_batch([audio_lib.audio_features(w, 16000) for w in waves])
    t = round_up(feats.shape[1], frame_bucket)
    feats = np.pad(feats, ((0, 0), (0, t - feats.shape[1]), (0, 0)))
    ids = [vocab.encode(s) for s in texts]
    width = max(len(i) for i in ids) if label_width is None else int(label_width)
    labels = np.zeros((len(ids), width), np.int32)
    label_mask = np.zeros_like(labels)
    for k, i in enumerate(ids):
        labels[k, :len(i)], label_mask[k, :len(i)] = i, 1
    return dict(feats=feats, lengths=lengths, labels=labels, label_mask=label_mask)


def tts_batch(text_ids: Sequence[Sequence[int]], codes: Sequence[Sequence[int]], n_text: int, n_code: int) -> dict:
    """Reply token ids and their codec ids -> ``text_ids [B, n_text]`` (0-padded), ``text_lens``,
    ``codes [B, n_code]`` (-1-padded) and ``code_lens`` for the speech decoder's loss."""
    ids = np.zeros((len(text_ids), n_text), np.int32)
    out = np.full((len(codes), n_code), -1, np.int32)
    for b, (t, k) in enumerate(zip(text_ids, codes)):
        ids[b, :len(t)], out[b, :len(k)] = t, k
    return dict(text_ids=ids, text_lens=np.array([len(t) for t in text_ids], np.int32), codes=out,
                code_lens=np.array([len(k) for k in codes], np.int32))
