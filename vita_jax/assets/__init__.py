"""Small real media bundled with the package (see each folder's README for provenance and licence)."""
import os

import soundfile as sf

ASSETS = os.path.dirname(os.path.abspath(__file__))
SPEECH = os.path.join(ASSETS, "speech")

# CMU ARCTIC transcripts of the bundled recordings
TRANSCRIPTS = {
    "arctic_a0007": "And you always want to see it in the superlative degree.",
    "arctic_a0009": "He turned sharply, and faced Gregson across the table.",
}
# word boundaries of a0009 from arctic_a0009_phone.lab (seconds): (start, end, words)
A0009_WORDS = [(0.13, 0.27, "he"), (0.27, 0.595, "turned"), (0.595, 1.14, "sharply"), (1.14, 1.28, "and"),
               (1.28, 1.575, "faced"), (1.575, 1.995, "gregson"), (1.995, 2.34, "across"), (2.34, 2.485, "the"),
               (2.485, 2.925, "table")]


def speech_clips():
    """Real clips with transcripts: the two full recordings plus word-aligned segments of a0009.
    Returns a list of ``(name, waveform float32 16 kHz, text)``."""
    clips = []
    for name, text in TRANSCRIPTS.items():
        wav, sr = sf.read(os.path.join(SPEECH, name + ".wav"), dtype="float32")
        assert sr == 16000
        clips.append((name, wav, text))
    a9 = clips[1][1]
    for i, j in ((0, 3), (3, 6), (6, 9), (1, 5)):
        start, end = A0009_WORDS[i][0], A0009_WORDS[j - 1][1]
        seg = a9[int(round(start * 16000)):int(round(end * 16000))]
        clips.append((f"arctic_a0009_w{i}-{j}", seg, " ".join(w for _, _, w in A0009_WORDS[i:j])))
    return clips
