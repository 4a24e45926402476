"""Experiment tracking: TensorBoard and MLflow sinks beside metrics.jsonl (``tracking:``)."""

from fedfm.tracking.sinks import MlflowSink, Sink, TensorBoardSink, open_sinks

__all__ = ["MlflowSink", "Sink", "TensorBoardSink", "open_sinks"]
