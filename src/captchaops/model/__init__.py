"""The model: the one image pipeline, the CRNN, CTC, ONNX export and reading, what a version is."""
