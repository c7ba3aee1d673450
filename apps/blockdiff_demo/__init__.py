"""The toy application on top of the library: the demo's data (`corpus`) and its task family with checkable answers
(`tasks`), a single-process trainer for the tiny AR base and a core-only conversion (`train`), held-out accuracy with
the decoding cost beside it (`evaluate`), and the main job's steps (`job`: `python -m blockdiff_demo`)."""
