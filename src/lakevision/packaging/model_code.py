"""MLflow "models from code" entry of the serving pyfunc: MLflow runs this file to build the model
instead of unpickling one, so nothing but the weights is serialized."""

import mlflow

from lakevision.packaging.pyfunc import LakevisionImageModel

mlflow.models.set_model(LakevisionImageModel())
