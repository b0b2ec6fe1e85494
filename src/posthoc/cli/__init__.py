"""The ``posthoc`` command line: train, demo, bench."""
