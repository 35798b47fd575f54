"""Data: shards (or annotation files) -> a task's batches with exact resume; transforms. See
docs/data.md for the shard layout, the resume design and measured throughput.
"""
from albef_ds.data.codec import SKIP_COUNTERS, CaptionCodec, SampleCodec, key_id
from albef_ds.data.shards import make_shards, resolve_corpora
from albef_ds.data.stream import ShardStream
from albef_ds.data.transforms import EvalTransform, TrainTransform, build_transform

__all__ = ["ShardStream", "SampleCodec", "CaptionCodec", "SKIP_COUNTERS", "key_id", "make_shards",
           "resolve_corpora", "build_transform", "TrainTransform", "EvalTransform"]
