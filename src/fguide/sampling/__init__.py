"""``fguide sample``'s job: sharded, resumable and distributed guided sampling.

The public entry is :func:`run_sampling` with a :class:`SampleConfig`. The package's modules,
in the order a run uses them: :mod:`~fguide.sampling.resolve` (the configuration's checks and
derived defaults), :mod:`~fguide.sampling.configs` (the named paper configurations),
:mod:`~fguide.sampling.batch` (labels, a batch, a shard) and :mod:`~fguide.sampling.run` (the
folder, the shards over processes, the merge). The networks come from the model-family
registry (:mod:`fguide.families`), the guide from the guide-kind registry
(:mod:`fguide.guides`): nothing here names a family or a kind of guide.
"""

from fguide.config import DEFAULT_SHARD_SIZE, SampleConfig, parse_flags
from fguide.distributed import DistributedRunError
from fguide.families import Components, build_components
from fguide.io.runs import ConfigMismatchError, plan_shards
from fguide.sampling.batch import NonFiniteSamplesError, sample_batch, sample_labels
from fguide.sampling.resolve import resolve_config
from fguide.sampling.run import SampleResult, run_sampling

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
