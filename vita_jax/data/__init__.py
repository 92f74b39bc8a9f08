"""Host-side data: media preprocessing (images, video frames, audio, text), the one batch builder
(``batch``), official sources (JSON, TFDS), the grain pipeline and the tiny synthetic sets."""
