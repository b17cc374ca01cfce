"""What runs inside vLLM's processes: ``plugin`` (registration), ``http`` (headers into
processor kwargs), ``policy`` (what a request gets, and K), ``metrics``, ``families`` (the
one table of model families), ``models`` (a family's processor and model classes) and
``vllm_private`` (the private vLLM names they rely on)."""
