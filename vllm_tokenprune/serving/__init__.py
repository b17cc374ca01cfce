"""What runs inside vLLM's processes: ``plugin`` (registration), ``http`` (headers into
processor kwargs), ``metrics``, ``models`` (a family's processor and model classes) and
``vllm_private`` (the private vLLM names they rely on)."""
