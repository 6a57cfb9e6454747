"""ragcache and vLLM: the KV connector vLLM loads (connector.py, blocks.py) and the client ragcache's
VLLMEngine talks to vLLM servers with (ragcache.engine.vllm).

connector.py runs inside vLLM's processes, so this package imports nothing of the engine, the
service or sentence-transformers: only ragcache.storage, ragcache.kv and, in connector.py, vLLM.
"""
