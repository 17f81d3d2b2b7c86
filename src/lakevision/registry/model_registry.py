"""The model registry: versions and the aliases the deployment moves.

Locally the registry is MLflow's sqlite store under the root; on Databricks it is Unity Catalog
(``databricks-uc``) with a three-level ``catalog.schema.model`` name. The aliases:

- ``challenger``: the version that passed the metric gate and waits to be deployed;
- ``champion``: the version the endpoint serves after a successful deployment;
- ``previous_champion``: the champion before that one, kept for a rollback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lakevision.errors import LakevisionError
from lakevision.runtime import Runtime
from lakevision.tracking import mlflow_client

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"


class RegistryError(LakevisionError, RuntimeError):
    pass


# Unity Catalog refuses these in a registered model's or version's tag key (the local sqlite
# registry does not, so the registry checks every key itself).
UC_TAG_KEY_FORBIDDEN = ".,-=/:"


def check_tag_key(key: str) -> None:
    bad = sorted({c for c in key if c in UC_TAG_KEY_FORBIDDEN})
    if not key or bad:
        raise RegistryError(f"tag key {key!r}: Unity Catalog refuses the characters {' '.join(bad) or '(empty key)'} "
                            f"in tag keys (forbidden: {UC_TAG_KEY_FORBIDDEN})")


def tag_key(*parts: str) -> str:
    """A Unity Catalog tag key from ``parts``: joined with ``_``, forbidden characters replaced."""
    key = "_".join(parts)
    return "".join("_" if c in UC_TAG_KEY_FORBIDDEN else c for c in key)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    model_uri: str  # the logged model this version was registered from (``models:/m-...``)
    run_id: str | None

    @property
    def registry_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def registered_name(rt: Runtime, model_name: str) -> str:
    """``model_name`` locally; ``catalog.schema.model_name`` in Unity Catalog."""
    if rt.kind == "local" or model_name.count(".") == 2:
        return model_name
    t = rt.config.target
    return f"{t.catalog}.{t.schema_}.{model_name}"


class ModelRegistry:
    def __init__(self, rt: Runtime, model_name: str):
        import mlflow

        mlflow.set_tracking_uri(rt.tracking_uri)
        mlflow.set_registry_uri(rt.registry_uri)
        self.name = registered_name(rt, model_name)
        self.client = mlflow_client(rt.tracking_uri, rt.registry_uri)

    def _version(self, mv) -> ModelVersion:
        return ModelVersion(self.name, str(mv.version), mv.source, mv.run_id)

    def by_alias(self, alias: str) -> ModelVersion | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._version(self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    def get(self, version: str | int) -> ModelVersion:
        from mlflow.exceptions import MlflowException

        try:
            return self._version(self.client.get_model_version(self.name, str(version)))
        except MlflowException as exc:
            raise RegistryError(f"{self.name} version {version}: {exc.message}") from None

    def find(self, model_uri: str) -> ModelVersion | None:
        """The version already registered from ``model_uri``, if any (a retried job must not
        register the same model twice)."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{self.name}'")
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        same = [mv for mv in versions if mv.source == model_uri]
        return self._version(min(same, key=lambda mv: int(mv.version))) if same else None

    def register(self, model_uri: str, tags: dict[str, str] | None = None) -> tuple[ModelVersion, bool]:
        """Register ``model_uri`` unless a version of it exists; returns (version, created)."""
        import mlflow

        for key in tags or {}:
            check_tag_key(key)
        existing = self.find(model_uri)
        if existing is not None:
            created = False
            mv = existing
        else:
            mv = self._version(mlflow.register_model(model_uri, self.name, await_registration_for=300))
            created = True
        for key, value in (tags or {}).items():
            self.client.set_model_version_tag(self.name, mv.version, key, value)
        return mv, created

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def delete_alias(self, alias: str) -> None:
        if self.by_alias(alias) is not None:
            self.client.delete_registered_model_alias(self.name, alias)

    def promote(self, version: str) -> ModelVersion | None:
        """``version`` becomes the champion and the old champion ``previous_champion``;
        returns the old champion (None when there was none or it is the same version)."""
        old = self.by_alias(CHAMPION)
        if old is not None and old.version == str(version):
            old = None  # a retried promotion: nothing moves
        if old is not None:
            self.set_alias(PREVIOUS_CHAMPION, old.version)
        self.set_alias(CHAMPION, str(version))
        challenger = self.by_alias(CHALLENGER)
        if challenger is not None and challenger.version == str(version):
            self.delete_alias(CHALLENGER)
        return old
