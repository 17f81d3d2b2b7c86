"""The packaged model: the MLflow pyfunc that training logs and serving runs, and its checked
TorchScript/ONNX exports."""
