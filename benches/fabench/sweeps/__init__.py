"""Sweeps over one kind of call, each with its own table: the prefill thread sweep
(``bench_prefill.py``), the decode cells with their bandwidth figures (``bench_decode.py``) and
the paged KV cache cells (``bench_paged.py``)."""
