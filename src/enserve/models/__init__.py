"""Network families of the search space, and small synthetic ONNX CNNs for serving demos/tests."""
