"""model: a base model as artifacts on disk: export, the ONNX Runtime import, int8, training graphs."""
