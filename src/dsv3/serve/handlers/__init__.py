"""OpenAI endpoint handlers, one module per endpoint (as vLLM's `serving_*.py`); `base.py` holds what
they share (validation, sampling parameters, engine fan-out), `streaming.py` the SSE helpers."""
