"""Typed configuration: the three YAML files of ``bundle/config`` and the deployment targets.

Everything that reads configuration goes through :func:`load_config`, so a bad key fails in one
place with a message that names the file and the key path. :mod:`.schema` holds the models,
:mod:`.loader` the files, profiles, environment and overrides.
"""

from lakevision.config.loader import (CONFIG_DIR_ENV, DEPLOYMENT_FIELD_ENVS, PROFILE_ENV, TARGET_ENV, TARGET_FIELD_ENVS,
                                      ConfigError, default_config_dir, load_config, load_yaml_model)
from lakevision.config.schema import (Architectures, CanarySettings, DataProcessing, Deployment, DistributedSettings,
                                      DriftSettings, EndpointSettings, LakevisionConfig, ModelSettings,
                                      MonitoringSettings, Optimization, ServingSettings, Splits, Target, Task,
                                      TrainData, Training, ValidationRules, WorkspaceSettings)

__all__ = [
    "CONFIG_DIR_ENV", "DEPLOYMENT_FIELD_ENVS", "PROFILE_ENV", "TARGET_ENV", "TARGET_FIELD_ENVS", "Architectures",
    "CanarySettings", "ConfigError", "DataProcessing", "Deployment", "DistributedSettings", "DriftSettings",
    "EndpointSettings", "LakevisionConfig", "ModelSettings", "MonitoringSettings", "Optimization", "ServingSettings",
    "Splits", "Target", "Task", "TrainData", "Training", "ValidationRules", "WorkspaceSettings", "default_config_dir",
    "load_config", "load_yaml_model",
]
