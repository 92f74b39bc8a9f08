"""The inference side of the batch builder, shared by ``chat`` / ``generate`` and the evaluators:

* :func:`chat_example`: a question (or a history) with optional image / audio / video -> the
  example ``{input_ids, pixels, audio}`` of the official generation prompt (template, system
  prompt, placeholders), media preprocessed exactly as training preprocesses a sample.
* :func:`inference_batch`: ids and media -> :func:`vita_jax.data.batch.build` with bucketed slots
  (tiles and clips to a power of two times the data-parallel size, frames to a multiple of
  ``config.frame_bucket``, the spliced length to a multiple of ``config.seq_bucket``), or with the
  slot counts given (several processes feeding one batch must agree on them).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

from vita_jax.data import batch as batch_lib
from vita_jax.data import text as text_lib
from vita_jax.sizes import round_up


def _check_text(text, where: str) -> None:
    if text is None:
        return
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: not valid Unicode text ({e.reason} at character {e.start})") from e


def check_media_arg(value, field: str, waveform: bool = False) -> None:
    """``ValueError`` naming ``field`` unless ``value`` is None, a path, a binary file object, a PIL
    image (images) or, with ``waveform``, ``(waveform, sample_rate)``."""
    if value is None or isinstance(value, (str, os.PathLike)) or hasattr(value, "read"):
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{field}: an empty path")
        return
    if field.endswith("image") and hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
        return
    if waveform and isinstance(value, tuple) and len(value) == 2 and not isinstance(value[1], bool) and \
            isinstance(value[1], (int, float, np.integer, np.floating)) and 0 < value[1] < float("inf"):
        return
    want = "a path, file object or PIL image" if field.endswith("image") else \
        "a path, file object or (waveform, sample_rate)" if waveform else "a path or file object"
    raise ValueError(f"{field}: expected {want}, got {type(value).__name__} {value!r:.40}")


def check_messages(messages, media: bool = False) -> None:
    """A question (str) or a history ``[(role, text[, audio]), ...]``: roles ``user`` / ``assistant``
    alternating from ``user`` and ending with ``user``, texts valid Unicode; an empty question needs media."""
    if isinstance(messages, str):
        _check_text(messages, "the question")
        if not messages.strip() and not media:
            raise ValueError("the question is empty and no image, video or audio is given: nothing to answer")
        return
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages: expected a question (str) or a non-empty list of (role, text) turns, "
                         f"got {type(messages).__name__}")
    for k, turn in enumerate(messages):
        if not isinstance(turn, (list, tuple)) or len(turn) not in (2, 3):
            raise ValueError(f"messages[{k}]: expected (role, text) or (role, text, audio), got {turn!r:.80}")
        want = ("user", "assistant")[k % 2]
        if turn[0] != want:
            raise ValueError(f"messages[{k}]: role {turn[0]!r}, expected {want!r} (turns alternate user / assistant "
                             "from a user turn)")
        _check_text(turn[1], f"messages[{k}]")
        if len(turn) == 3:
            check_media_arg(turn[2], f"messages[{k}] audio", waveform=True)
    if messages[-1][0] != "user":
        raise ValueError("messages: the last turn is the assistant's; a reply needs a user turn last")


def chat_example(prep: batch_lib.Preprocess, tokenizer, messages: Union[str, Sequence], image=None, audio=None,
                 video=None) -> dict:
    """``input_ids`` (int64, ``-200`` / ``-500`` placeholders), ``pixels`` (uint8 ``[tiles, 3, S, S]``
    or None: the model normalises them) and ``audio`` (a list of fbank clips ``[frames, mel]``) of a
    generation prompt. ``audio``: a path or ``(waveform, rate)``; typed control strings and placeholders
    are text. A history turn may be ``(role, text, audio)``: a spoken turn, its clip placed before the
    question's."""
    if video is not None and image is not None:
        raise ValueError("image and video: give one of them, not both (the prompt holds one visual input)")
    for value, field in ((image, "image"), (audio, "audio"), (video, "video")):
        check_media_arg(value, field, waveform=field == "audio")
    check_messages(messages, media=image is not None or video is not None or audio is not None)
    pixels, tiles, frames = None, (), 0
    if video is not None:
        pixels = prep.frames(video)
        frames, modality = len(pixels), "video"
    elif image is not None:
        pixels = prep.tiles(image)
        tiles, modality = (len(pixels),), "image"
    else:
        modality = "lang"
    fbank = lambda a: prep.fbank(*a) if isinstance(a, tuple) else prep.fbank(a)  # noqa: E731
    clips = []
    # typed control strings and placeholders are text, never turn boundaries or media slots
    if isinstance(messages, str):
        msgs = text_lib.generation_messages(text_lib.as_text(messages, tokenizer), modality, tiles, frames,
                                            audio is not None)
    else:
        history = []
        for role, content, *spoken in messages:  # a history turn (role, text, audio) was spoken: its clip
            said = bool(spoken) and spoken[0] is not None
            history.append((role, (text_lib.as_text(content, tokenizer) or "")
                            + (text_lib.AUDIO_TOKEN if said else "")))
            clips += [fbank(spoken[0])] if said else []
        last = text_lib.generation_messages(history[-1][1], modality, tiles, frames, audio is not None)
        msgs = history[:-1] + last
    clips += [fbank(audio)] if audio is not None else []
    ids = text_lib.tokenize_with_placeholders(text_lib.build_prompt(msgs, modality), tokenizer)
    return dict(input_ids=np.asarray(ids, np.int64), pixels=pixels, audio=clips)


def inference_batch(module, config, input_ids, attention_mask=None, labels=None, pixels=None,
                    clips: Sequence[np.ndarray] = (), clip_lengths=None, *, dp: int = 1,
                    max_length: Optional[int] = None, tile_slots: Optional[int] = None,
                    clip_slots: Optional[int] = None, frame_slots: Optional[int] = None, length: Optional[int] = None,
                    tile_offset: int = 0, clip_offset: int = 0):
    """The host batch of an inference call -> ``(arrays, plan)`` for ``module`` (a
    :class:`~vita_jax.models.vita.VITA`). ``pixels``: tiles in placeholder order; ``clips``: fbank
    clips (``clip_lengths``: their real frames). Slot counts and the spliced ``length`` default to
    buckets of what is given; ``tile_offset`` / ``clip_offset`` place ``src`` in global arrays."""
    n_tiles, n_clips = (0 if pixels is None else len(pixels)), len(clips)
    whale_cfg = module.whale_cfg
    lens = [len(c) for c in clips] if clip_lengths is None else [int(n) for n in clip_lengths]
    if frame_slots is None:
        fb = int(config.get("frame_bucket", 64))
        frame_slots = min(round_up(max(len(c) for c in clips), fb), whale_cfg.max_frames) if n_clips else 0
    if tile_slots is None:
        tile_slots = batch_lib.bucket(n_tiles, dp) if n_tiles else 0
    if clip_slots is None:
        clip_slots = batch_lib.bucket(n_clips, dp) if n_clips else 0
    return batch_lib.build(
        input_ids, attention_mask, labels, pixels, list(clips), clip_lengths=lens,
        tokens_per_tile=module.tokens_per_tile, max_length=max_length or config.tokenizer_model_max_length,
        pad_to=length or config.get("seq_bucket", 64), tile_slots=tile_slots, clip_slots=clip_slots,
        frame_slots=frame_slots, mel_bins=whale_cfg.input_dim if whale_cfg is not None else 80,
        tile_offset=tile_offset, clip_offset=clip_offset,
        image_size=module.vit_cfg.image_size if module.vit_cfg is not None else 0)
