"""Bundles on disk: the manifest contract, onnxruntime sessions and the model repository."""
