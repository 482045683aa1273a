"""Development tools, outside the shipped packages: the sm_80/sm_90 compile checker (``aot``,
``./dev kernels``), the per-kernel cost model (``cost``), the prepared GPU command
(``gpucheck``, ``./dev gpu``), the small cases that launch every kernel (``smoke``), the
mutation run (``mutate.py``) and the README's figures (``readme_figures.py``). Run them from
the repository root (``python -m tools.aot``)."""
