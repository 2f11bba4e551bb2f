"""Interop: how models come in (checkpoints, adapt, ONNX) and go out (export, deploy)."""
