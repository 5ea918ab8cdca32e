"""Container runtime: the interface (:mod:`.base`) and its Docker implementation (:mod:`.docker`)."""

from worker.runtime.base import (
    ContainerRuntime,
    EngineUnavailable,
    FailureCode,
    FailureReason,
    GpuStats,
    ImageInfo,
    ImageRejected,
    Mount,
    ResourceLimits,
    RunResult,
    RunSpec,
    check_image,
    per_case_wall_times,
)

__all__ = [
    "ContainerRuntime",
    "EngineUnavailable",
    "FailureCode",
    "FailureReason",
    "GpuStats",
    "ImageInfo",
    "ImageRejected",
    "Mount",
    "ResourceLimits",
    "RunResult",
    "RunSpec",
    "check_image",
    "per_case_wall_times",
]
