"""The command line's tools (serving code never imports them): ``serve``, ``bench`` (with
``bench_report``, ``overhead`` and ``workload``), ``eval`` (with ``eval_report``), ``costs``,
``timing`` (the one timing harness), the server ``launcher``, the ``client`` helpers,
``provenance`` of results, and the vLLM CLI bridge (``vllm_cli``, ``vllm_passthrough``)."""
