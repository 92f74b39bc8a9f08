"""Inference: prefill + cached decoding with sampling."""
