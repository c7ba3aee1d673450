"""The toy application on top of the library: the demo's data (`corpus`), a single-process trainer for the tiny AR
base and a core-only conversion (`train`), and the main job's steps (`job`: `python -m blockdiff_demo`)."""
