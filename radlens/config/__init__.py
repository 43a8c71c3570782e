"""Configuration: pydantic-settings models, a YAML file and RADLENS_* environment variables."""

from __future__ import annotations

from pathlib import Path

from radlens.config.settings import (
    AssemblySettings,
    AuditSettings,
    ClusterSettings,
    ComputeSettings,
    DensitySettings,
    DermoscopySettings,
    Destination,
    DicomSettings,
    LlmSettings,
    LogSettings,
    MetricsSettings,
    ModelSettings,
    OutboxSettings,
    OutputSettings,
    Peer,
    PriorVisitSettings,
    RetentionSettings,
    RoutingRule,
    RoutingSettings,
    Settings,
    StateSettings,
    StorageSettings,
    TlsSettings,
    WorkerSettings,
    load_settings,
)

DEFAULT_YAML = Path(__file__).with_name("default.yaml")

__all__ = [
    "DEFAULT_YAML",
    "AssemblySettings",
    "AuditSettings",
    "ClusterSettings",
    "ComputeSettings",
    "Destination",
    "DicomSettings",
    "LlmSettings",
    "LogSettings",
    "MetricsSettings",
    "DensitySettings",
    "DermoscopySettings",
    "ModelSettings",
    "OutboxSettings",
    "RetentionSettings",
    "OutputSettings",
    "Peer",
    "PriorVisitSettings",
    "RoutingRule",
    "RoutingSettings",
    "Settings",
    "StateSettings",
    "StorageSettings",
    "TlsSettings",
    "WorkerSettings",
    "load_settings",
]
