"""Checkpoint → ONNX graph for the engine: the graph builder, the int8/int4 quantizers, the int8 KV
cache, and `prepare_model`, which converts once into the cache and reuses the result.

It sits above `engine/` (it runs a graph to calibrate the KV cache and asks `engine.cpu` which int8
form this CPU computes exactly) and `models/` (files, weights, config, the cache folder); see
docs/architecture.md.
"""
