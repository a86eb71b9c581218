"""Communication on c10d: allreduce algorithms (:mod:`.reducers`), their alpha-beta cost model
(:mod:`.cost_model`), gradient bucketing (:mod:`.bucketing`) and DDP comm hooks (:mod:`.ddp_hooks`)."""

from __future__ import annotations

from distlearn.comm.reducers import (
    REDUCERS,
    BackendReducer,
    RabenseifnerReducer,
    Reducer,
    RingReducer,
    SegmentedRingReducer,
    TreeReducer,
    create_reducer,
)

__all__ = [
    "REDUCERS",
    "BackendReducer",
    "RabenseifnerReducer",
    "Reducer",
    "RingReducer",
    "SegmentedRingReducer",
    "TreeReducer",
    "create_reducer",
]
