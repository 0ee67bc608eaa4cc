"""torch -> ONNX bundles with proven parity (needs the ``train`` extra)."""
