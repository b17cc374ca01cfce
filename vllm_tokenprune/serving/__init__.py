"""What runs inside vLLM's processes: ``plugin`` (registration), ``http`` (headers into
processor kwargs), ``policy`` (what a request gets, and K), ``metrics``, ``families`` (the
one table of model families) and ``models`` (a family's processor and model classes)."""
