"""Host-side preprocessing (numpy): images and video frames, audio, text."""
