"""The model runner: load a model, compute chunk KV, blend cached chunks, generate.

Read in the order of a request: loader -> prompt -> chunks (prepacked chunk KV) ->
blend (fused KV with selective recomputation) -> generate; runner ties them together.
Knows torch and transformers; knows nothing of HTTP or Redis.
"""
