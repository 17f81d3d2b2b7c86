"""The metric gate and the model registry: which model versions may be deployed."""
