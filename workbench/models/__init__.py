"""Models: the zoo, ONNX import, the ahead-of-time compiler and the paged-weights artifact."""
