"""The benchmark harness: one module per question, run as ``python -m bench.<module>`` from the
repository root; ``bench.common`` holds what they share, ``bench/results`` the committed runs."""
