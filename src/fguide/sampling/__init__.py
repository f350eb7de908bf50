"""``fguide sample``'s job: sharded, resumable and distributed guided sampling."""

from fguide.sampling.run import (
    DEFAULT_SHARD_SIZE,
    Components,
    ConfigMismatchError,
    DistributedRunError,
    NonFiniteSamplesError,
    SampleConfig,
    SampleResult,
    build_components,
    parse_flags,
    plan_shards,
    resolve_config,
    run_sampling,
    sample_batch,
    sample_labels,
)

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "Components",
    "ConfigMismatchError",
    "DistributedRunError",
    "NonFiniteSamplesError",
    "SampleConfig",
    "SampleResult",
    "build_components",
    "parse_flags",
    "plan_shards",
    "resolve_config",
    "run_sampling",
    "sample_batch",
    "sample_labels",
]
