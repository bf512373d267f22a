"""The feature store: where captured tensors live between producer and trainer."""

from services.store.base import (
    FeatureCorrupt,
    FeatureLost,
    FeatureStore,
    StoreError,
    StoreFull,
    StoreUnavailable,
)

__all__ = [
    "FeatureCorrupt",
    "FeatureLost",
    "FeatureStore",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
]
