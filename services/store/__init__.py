"""The feature store: where captured tensors live between producer and trainer."""

from services.store.base import (
    FeatureCorrupt,
    FeatureLost,
    FeatureStore,
    StoreError,
    StoreFull,
    StoreUnavailable,
)
from services.store.factory import open_store

__all__ = [
    "FeatureCorrupt",
    "FeatureLost",
    "FeatureStore",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "open_store",
]
