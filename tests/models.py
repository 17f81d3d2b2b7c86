"""Real MLflow runs with real lakevision models, logged the way the train job logs them, for the
registry and serving tests (which test what happens after training, not training itself)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import mlflow
import torch

from lakevision.packaging.pyfunc import ImageModel, ServingSpec, log_image_model
from lakevision.tracking import DATA_VERSION_TAG, ExperimentTracker
from lakevision.data.samples import SplitRecords, load_split
from lakevision.packaging.architectures import build_model
from lakevision.training.train import MODEL_URI_TAG, REFERENCE_PROFILE_ARTIFACT, TASK_TAG, reference_profile

IMAGE_SIZE = 64  # small: these models are untrained, only their plumbing matters


def spec_for(records: SplitRecords, task: str = "classification", arch: str = "resnet18") -> ServingSpec:
    return ServingSpec(task=task, semantic=arch.startswith("deeplab"), image_size=IMAGE_SIZE,
                       category_ids=records.category_ids, category_names=records.category_names,
                       max_image_pixels=200 * 200, max_batch_size=8, architecture=arch)


def log_trained_model(runtime, seed: int, task: str = "classification", arch: str = "resnet18",
                      best_metric: float | None = None, max_image_pixels: int = 200 * 200) -> tuple[str, str]:
    """A run like the train job's: params, tags, the serving pyfunc. Returns (model_uri, run_id)."""
    records = load_split(runtime, ["train", "val", "test"])
    torch.manual_seed(seed)
    n = len(records.category_ids) + (0 if task == "classification" else 1)
    model = build_model(task, arch, n, "none", IMAGE_SIZE, 64, 100).eval()
    tracker = ExperimentTracker("lakevision", tracking_uri=runtime.tracking_uri, registry_uri=runtime.registry_uri)
    with tracker:
        tracker.log_parameters({"task": task, "training": {"data": {"image_size": IMAGE_SIZE}}})
        spec = spec_for(records, task, arch)
        spec.max_image_pixels = max_image_pixels
        info = log_image_model(model, spec, Path(records.image_paths[0]).read_bytes())
        tracker.log_dict(reference_profile(ImageModel(model, spec), load_split(runtime, "train")).to_dict(),
                         REFERENCE_PROFILE_ARTIFACT)
        tracker.set_tags({MODEL_URI_TAG: info.model_uri, TASK_TAG: task, DATA_VERSION_TAG: str(records.version)})
        if best_metric is not None:
            tracker.log_metrics({"best_val_acc" if task == "classification" else "best_val_map_50": best_metric})
    return info.model_uri, tracker.run_id


def corrupt_weights(model_uri: str) -> None:
    """Overwrite a logged model's stored weights: a registered version that then fails to load."""
    model_id = model_uri.removeprefix("models:/")
    stored = Path(urlparse(mlflow.get_logged_model(model_id).artifact_location).path)
    next(stored.rglob("model.pt")).write_bytes(b"not a model")


class Unsendable(mlflow.pyfunc.PythonModel):
    """Loads and predicts, then answers what no server can send: the endpoint's 500 (an exception
    inside predict would be MLflow's 400, "an unexpected error while evaluating the model")."""

    def predict(self, context, model_input, params=None):
        import pandas as pd

        return pd.DataFrame({"answer": [object()] * len(model_input)})


def log_unsendable_model() -> str:
    """A model version that answers every request with a server error; its model URI."""
    import mlflow.pyfunc
    import pandas as pd

    from lakevision.packaging.pyfunc import IMAGE_COLUMN

    with mlflow.start_run():
        return mlflow.pyfunc.log_model(name="model", python_model=Unsendable(), pip_requirements=["mlflow"],
                                       input_example=pd.DataFrame({IMAGE_COLUMN: ["x"]})).model_uri
